"""trident.data"""
