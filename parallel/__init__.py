"""trident.parallel"""
