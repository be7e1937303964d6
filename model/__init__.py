"""trident.model"""
