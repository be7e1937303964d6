"""trident.tools"""
