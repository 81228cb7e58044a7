"""Bridges to other recommender libraries (``refit.integrations.recbole``: RecBole's DiffRec)."""
