"""trident.planning"""
