"""trident.parallel.pipeline"""
