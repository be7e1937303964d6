"""trident.parallel.context"""
