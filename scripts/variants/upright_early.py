"""For scripts/ab-variants.py: how many of the upright query's candidates a search whose views
were asked for early (its best cosine below EARLY_VIEWS_BELOW) verifies before it scans them."""

import os

from simserve.ranking import pipeline

VARIANTS = {f"upright {n}": (lambda n: lambda service: setattr(pipeline, "UPRIGHT_FIRST_EARLY", n))(int(n)) for n in os.environ.get("UPRIGHTS", "15,3").split(",")}
