"""trident.inference"""
