"""The code every system in the suite runs, so petri and its peers do the same work."""

import csv
import io
import random

# The stateful round trip: the smallest execution that returns a value.
ROUND_TRIP_CODE = "1+1"

# A first execution an agent typically sends: import pandas and summarise a CSV it uploaded.
CSV_NAME = "sales.csv"
PANDAS_CODE = f"""\
import pandas as pd
frame = pd.read_csv({CSV_NAME!r})
summary = frame.groupby("region")["amount"].agg(["count", "sum", "mean"]).round(2)
print(summary.to_string())
"""


def sales_csv(rows: int = 2000, seed: int = 7) -> bytes:
    """A small CSV of sales by region, the same bytes on every run."""
    generator = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["day", "region", "amount"])
    for day in range(rows):
        region = generator.choice(["north", "south", "east", "west"])
        writer.writerow([day % 365, region, round(generator.uniform(1, 500), 2)])
    return out.getvalue().encode()
