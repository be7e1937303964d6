"""trident.training"""
