"""A calibrated standard deviation for each predicted vote fraction, and how to check it.

The raw spread (std over members x TTA views) ranks galaxies by error but is several times smaller
than the error, so it cannot be read as an error bar. This file owns the model that turns it into one:

    sigma^2 = scale^2 * spread^2 + floor^2 + shape^2 * p (1 - p),    sigma <= 0.5

one (scale, floor, shape) per output column, fitted on the val split: first by maximising the
Gaussian likelihood of the residuals (prediction - truth), which says how sigma varies from galaxy
to galaxy, then scaled per output so that +-1 and +-2 sigma hold close to 68% and 95% of the val
errors (coverage_factor says why the likelihood alone does not). p is the predicted vote fraction:
one near 0 or 1 has small errors (most galaxies never reach the deeper questions), which the
p (1 - p) term lets sigma follow even for a single model without TTA, whose spread is 0 and whose
sigma is then sqrt(floor^2 + shape^2 p (1 - p)). Per output, not per question: the answers of one
question have errors of very different size (Class1.3 "star or artifact" against Class1.1
"smooth"), so a shared sigma would be too wide for one and too narrow for the other.

The fitted model is a small JSON-able dict (to_json / from_json, save / load as calibration.json)
that records the setting its spread came from (members, TTA): the scale of a spread over 16 views
does not apply to a spread over 2. Also here: coverage of +-1 and +-2 sigma, overall and per
question, and the calibration curve (nominal Gaussian coverage against the observed) with its plot.
"""
import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import erf

from dataset import LABEL_COLUMNS, NUM_OUTPUTS, QUESTIONS
from galaxy.files import DataError, atomic_write

CALIBRATION_FILE = "calibration.json"
FORM = "sigma^2 = scale^2 * spread^2 + floor^2 + shape^2 * p(1-p), sigma <= max_sigma"
MIN_FLOOR = 1e-3    # a sigma of 0 would make any nonzero error infinitely unlikely
MAX_SIGMA = 0.5     # the largest standard deviation a number in [0, 1] can have
TERMS = ("scale", "floor", "shape")
FACTOR_GRID = np.exp(np.linspace(np.log(0.25), np.log(4), 801))   # coverage_factor's candidates, 0.35% apart

# --- inputs ----------------------------------------------------------------------------------------

def as_outputs(name, values, rows=None):
    """values as a float64 (N, 37) array; ValueError naming the input when it has another shape or
    holds a NaN or inf (a sigma fitted on them, or checked against them, would mean nothing)."""
    array = np.asarray(values, np.float64)
    if array.ndim != 2 or array.shape[1] != NUM_OUTPUTS or (rows is not None and len(array) != rows):
        want = f"({rows if rows is not None else 'N'}, {NUM_OUTPUTS})"
        raise ValueError(f"{name} has shape {array.shape}; expected {want}, one column per vote fraction")
    bad = ~np.isfinite(array)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite values (first: row {row}, "
                         f"{LABEL_COLUMNS[column]}); leave those galaxies out")
    return array


def spread_or_zero(spread, rows):
    """The spread as (N, 37); None or 0 (one model, no TTA) is a spread of zeros."""
    if spread is None or np.isscalar(spread) and spread == 0:
        return np.zeros((rows, NUM_OUTPUTS))
    spread = as_outputs("spread", spread, rows)
    if (spread < 0).any():
        raise ValueError("spread holds negative values; it is a standard deviation")
    return spread


def variance_terms(predictions, spread):
    """(N, 37, 3): what each of scale^2, floor^2 and shape^2 multiplies in sigma^2."""
    p = np.clip(predictions, 0.0, 1.0)
    return np.stack([spread ** 2, np.ones_like(p), p * (1 - p)], axis=-1)


# --- fitting -----------------------------------------------------------------------------------------

def _negative_log_likelihood(coefficients, design, squared_errors):
    """Mean Gaussian NLL (up to constants) over galaxies, summed over outputs, and its gradient.

    coefficients (37 * 3,) multiply design (N, 37, 3) into each variance; both are scaled so the
    coefficients are of order 1, which keeps L-BFGS-B's steps sensible for every output alike.
    """
    variance = np.einsum("njk,jk->nj", design, coefficients.reshape(NUM_OUTPUTS, -1))
    ratio = squared_errors / variance
    value = np.mean(np.log(variance) + ratio, axis=0).sum()
    gradient = np.einsum("njk,nj->jk", design, (1 - ratio) / variance) / len(variance)
    return value, gradient.ravel()


def fit_variance(predictions, truth, spread, shape=True):
    """(37, 3) maximum-likelihood (scale, floor, shape) for Gaussian residuals, each output on its own.

    A term that is 0 for every galaxy (no spread; shape=False) keeps a coefficient of 0. With only
    the floor left, floor^2 is exactly the output's mean squared error.
    """
    squared_errors = (predictions - truth) ** 2
    design = variance_terms(predictions, spread)
    used = design.mean(0) > 0
    used[:, 2] &= shape
    norm = np.where(used, design.mean(0), 1.0)
    mse = np.maximum(squared_errors.mean(0), MIN_FLOOR ** 2)
    lower = np.zeros_like(norm)
    lower[:, 1] = MIN_FLOOR ** 2 / mse                  # floor >= MIN_FLOOR, in the scaled units
    start = np.maximum(np.where(used, 1.0 / used.sum(1, keepdims=True), 0.0), lower)
    result = minimize(_negative_log_likelihood, start.ravel(), jac=True, method="L-BFGS-B",
                      args=(design / norm, squared_errors / mse),
                      bounds=list(zip(lower.ravel(), np.where(used, np.inf, 0.0).ravel())), options={"maxiter": 500})
    return np.sqrt(np.maximum(result.x.reshape(NUM_OUTPUTS, -1) * mse[:, None] / norm, 0.0))


def coverage_factor(z):
    """The factor m on sigma that brings the coverage of +-1 and +-2 sigma closest to 68.3% and 95.4%
    (the larger miss as small as it can be), for z = |error| / sigma of one output's galaxies.

    Vote-fraction errors are heavy-tailed: on the deeper questions most galaxies' truth is 0 and
    their error tiny, while a few rare ones are off by 0.3. The maximum-likelihood sigma is their
    RMS: it covers about 80% within +-1 sigma and 95% within +-2 (measured on real galaxies); no
    single width gets both right, and this one misses each by a few points instead of one by 12.
    For Gaussian errors m is about 1.
    """
    z = np.sort(z)
    inside = [np.searchsorted(z, k * FACTOR_GRID, side="right") / len(z) * 100 for k in (1, 2)]
    miss = np.maximum(np.abs(inside[0] - nominal_coverage(1)), np.abs(inside[1] - nominal_coverage(2)))
    best = np.flatnonzero(miss == miss.min())
    return float(FACTOR_GRID[best[len(best) // 2]])     # the middle of the best stretch: coverage is a step function


def fit_calibration(predictions, truth, spread=None, members=1, tta=False, shape=True, match_coverage=True):
    """The calibration (a dict, see the module docstring) fitted on one split, e.g. val.

    predictions, truth and spread are (N, 37); spread None means one model without TTA. members and
    tta record the setting the spread came from. shape=False leaves out the p (1 - p) term. The
    Gaussian maximum-likelihood fit (fit_variance) says how sigma varies from galaxy to galaxy;
    match_coverage then widens or narrows each output's sigma by coverage_factor, which is folded
    into scale, floor and shape and recorded as coverage_factor. With neither spread, shape nor
    match_coverage, floor is exactly each output's RMSE.
    """
    predictions = as_outputs("predictions", predictions)
    truth = as_outputs("truth", truth, len(predictions))
    spread = spread_or_zero(spread, len(predictions))
    if len(predictions) < 2:
        raise ValueError(f"{len(predictions)} galaxies are too few to fit a calibration; fit it on the val split")
    params = fit_variance(predictions, truth, spread, shape)
    calibration = {"form": FORM, "max_sigma": MAX_SIGMA, "members": int(members), "tta": bool(tta),
                   "galaxies": len(predictions), "columns": list(LABEL_COLUMNS)}
    factor = np.ones(NUM_OUTPUTS)
    if match_coverage:
        ml = {**calibration, **{term: params[:, k].tolist() for k, term in enumerate(TERMS)}}
        z = np.abs(predictions - truth) / calibrated_sigma(ml, predictions, spread)
        factor = np.array([coverage_factor(z[:, j]) for j in range(NUM_OUTPUTS)])
    params = params * factor[:, None]
    params[:, 1] = np.maximum(params[:, 1], MIN_FLOOR)
    calibration.update({term: [round(float(v), 6) for v in params[:, k]] for k, term in enumerate(TERMS)})
    calibration["coverage_factor"] = [round(float(v), 4) for v in factor]
    sigma = calibrated_sigma(calibration, predictions, spread)
    calibration["fit_coverage"] = {f"{k}sigma": round(float(within(predictions, sigma, truth, k).mean() * 100), 2)
                                   for k in (1, 2)}
    return calibration


def calibrated_sigma(calibration, predictions, spread=None):
    """(N, 37) calibrated standard deviation of each predicted vote fraction, in [MIN_FLOOR, max_sigma]."""
    predictions = as_outputs("predictions", predictions)
    spread = spread_or_zero(spread, len(predictions))
    squares = np.array([calibration[term] for term in TERMS], np.float64).T ** 2    # (37, 3)
    variance = np.einsum("njk,jk->nj", variance_terms(predictions, spread), squares)
    return np.clip(np.sqrt(variance), MIN_FLOOR, calibration.get("max_sigma", MAX_SIGMA))


def views_text(members, tta):
    return f"{members} member{'s' if members != 1 else ''}{' with 8-view TTA' if tta else ', no TTA'}"


def calibration_mismatch(calibration, members, tta):
    """"" when calibration was fitted on the spread of this many members and this TTA setting, else
    why it does not apply: the spread's size depends on how many predictions it is taken over."""
    if calibration["members"] == members and calibration["tta"] == bool(tta):
        return ""
    return f"it was fitted for {views_text(calibration['members'], calibration['tta'])}, not {views_text(members, tta)}"


# --- the file ------------------------------------------------------------------------------------------

def from_dict(data, source="the calibration"):
    """A calibration checked for what calibrated_sigma needs; ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} is not a JSON object")
    missing = [key for key in TERMS + ("columns", "members", "tta") if key not in data]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    if list(data["columns"]) != LABEL_COLUMNS:
        raise ValueError(f"{source} is not for the {NUM_OUTPUTS} Galaxy Zoo vote fractions in Kaggle's order")
    for term in TERMS:
        try:
            values = np.asarray(data[term], np.float64) if isinstance(data[term], list) else np.array([np.nan])
        except (TypeError, ValueError):
            values = np.array([np.nan])
        if values.shape != (NUM_OUTPUTS,) or not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"{source}: {term} must be {NUM_OUTPUTS} finite numbers >= 0")
    if type(data["members"]) is not int or data["members"] < 1 or type(data["tta"]) is not bool:
        raise ValueError(f"{source}: members must be a whole number >= 1 and tta true or false")
    return data


def to_json(calibration):
    return json.dumps(calibration, indent=1)


def from_json(text, source="the calibration"):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not JSON ({err})") from None
    return from_dict(data, source)


def save_calibration(calibration, path):
    """calibration as JSON at path (a folder gets calibration.json), written whole; returns the path."""
    path = os.path.join(path, CALIBRATION_FILE) if os.path.isdir(path) else path
    text = to_json(from_dict(calibration)) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load_calibration(path):
    """The calibration saved at path (a folder: its calibration.json); DataError naming the file and the fix."""
    path = os.path.join(path, CALIBRATION_FILE) if os.path.isdir(path) else path
    try:
        with open(path) as f:
            return from_json(f.read(), path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"cannot read the calibration {path} ({err}); fit it again on the val split") from None


# --- is it calibrated? ----------------------------------------------------------------------------------

def nominal_coverage(z):
    """Percent of a Gaussian within +-z sigma."""
    return 100 * erf(np.asarray(z, np.float64) / math.sqrt(2))


def within(predictions, sigma, truth, z):
    """(N, 37) bool: the truth lies within +-z sigma of the prediction."""
    return np.abs(predictions - truth) <= z * sigma


def checked(predictions, sigma, truth):
    predictions = as_outputs("predictions", predictions)
    return predictions, as_outputs("sigma", sigma, len(predictions)), as_outputs("truth", truth, len(predictions))


def coverage_table(predictions, sigma, truth):
    """Percent of vote fractions within +-1 and +-2 sigma, over all 37 outputs and per question, as a
    DataFrame: rows "all", "Q1" ... "Q11"; columns question, text, nominal_1sigma, observed_1sigma,
    nominal_2sigma, observed_2sigma."""
    predictions, sigma, truth = checked(predictions, sigma, truth)
    inside = {k: within(predictions, sigma, truth, k) for k in (1, 2)}
    parts = [("all", "all 37 outputs", list(range(NUM_OUTPUTS)))]
    parts += [(f"Q{q.number}", q.text, [LABEL_COLUMNS.index(c) for c in q.columns]) for q in QUESTIONS]
    rows = []
    for name, text, columns in parts:
        row = {"question": name, "text": text}
        for k in (1, 2):
            row[f"nominal_{k}sigma"] = round(float(nominal_coverage(k)), 1)
            row[f"observed_{k}sigma"] = float(inside[k][:, columns].mean() * 100) if len(predictions) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_curve(predictions, sigma, truth, z=None):
    """DataFrame z, nominal, observed: for each z (default 0.1 to 3 by 0.1) the Gaussian's percent within
    +-z sigma and the observed percent of vote fractions with |error| <= z sigma."""
    predictions, sigma, truth = checked(predictions, sigma, truth)
    z = np.round(np.arange(1, 31) / 10, 2) if z is None else np.asarray(z, np.float64)
    error = np.abs(predictions - truth) / sigma
    observed = [float((error <= value).mean() * 100) if error.size else math.nan for value in z]
    return pd.DataFrame({"z": z, "nominal": nominal_coverage(z), "observed": observed})


def plot_calibration(curves, path, title="Calibration of the predicted sigma"):
    """Nominal against observed coverage with the y = x line, one line per {label: calibration_curve}, as
    the PNG path (written as it is: the caller picks a temporary name when it must be atomic)."""
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 100], [0, 100], color="gray", ls="--", label="y = x (calibrated)")
    for label, curve in curves.items():
        ax.plot(curve["nominal"], curve["observed"], "o-", ms=3, label=label)
    for k in (1, 2):
        ax.axvline(nominal_coverage(k), color="lightgray", lw=0.8)
        ax.text(nominal_coverage(k), 2, f"±{k}σ ", fontsize=8, color="gray", ha="right")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("nominal coverage of ±z σ (Gaussian), %")
    ax.set_ylabel("observed: vote fractions within ±z σ, %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110, format="png")
