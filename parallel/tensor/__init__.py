"""trident.parallel.tensor"""
