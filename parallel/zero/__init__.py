"""trident.parallel.zero"""
