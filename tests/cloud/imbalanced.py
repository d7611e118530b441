"""A generated imbalanced binary dataset: card payments, ~3% of them labelled "fraud".

Seeded and small enough for fast tests. The signal is learnable but noisy: four numeric
columns and one categorical column shift the log-odds of fraud, and the label is drawn from
those odds, so no model separates the classes perfectly. A plain model at the 0.5 threshold
mostly answers "legit"; class weights or a tuned threshold recover the minority class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = ("amount", "hour", "distance_km", "tx_last_day", "merchant", "label")
MERCHANTS = ("grocery", "fuel", "online", "travel", "electronics")
# Log-odds added by each merchant kind: online and electronics payments are riskier.
MERCHANT_RISK = {"grocery": -0.9, "fuel": -0.45, "online": 1.05, "travel": 0.45,
                 "electronics": 1.5}
# Chosen so that about 3% of the rows are fraud with the default seed.
INTERCEPT = -8.1


def fraud_rows(rows: int = 6000, seed: int = 0) -> list[tuple[float, int, float, int, str, str]]:
    """The rows of :func:`fraud_csv` as tuples in :data:`COLUMNS` order."""
    rng = np.random.default_rng(seed)
    amount = np.round(rng.lognormal(3.5, 0.9, rows), 2)
    hour = rng.integers(0, 24, rows)
    distance = np.round(rng.exponential(8.0, rows), 1)
    tx_last_day = rng.poisson(2.0, rows)
    merchant = rng.choice(np.array(MERCHANTS), rows)
    night = ((hour <= 5) | (hour >= 23)).astype(float)
    log_odds = (INTERCEPT + 1.65 * (np.log(amount) - 3.5) + 1.8 * night
                + 0.09 * distance + 0.5 * tx_last_day
                + np.array([MERCHANT_RISK[str(m)] for m in merchant])
                + rng.normal(0.0, 0.5, rows))  # noise the features do not explain
    fraud = rng.random(rows) < 1.0 / (1.0 + np.exp(-log_odds))
    return [(float(amount[i]), int(hour[i]), float(distance[i]), int(tx_last_day[i]),
             str(merchant[i]), "fraud" if fraud[i] else "legit") for i in range(rows)]


def fraud_csv(path: Path, rows: int = 6000, seed: int = 0) -> Path:
    """Write the dataset as a CSV (target column ``label``: "legit"/"fraud") and return the path."""
    lines = [",".join(COLUMNS)]
    lines += [f"{a},{h},{d},{t},{m},{y}" for a, h, d, t, m, y in fraud_rows(rows, seed)]
    path.write_text("\n".join(lines) + "\n")
    return path
