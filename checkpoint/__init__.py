"""trident.checkpoint"""
