"""A calibrated standard deviation for each predicted vote fraction, and how to check it.

The raw spread (std over members x TTA views) ranks galaxies by error but is several times smaller
than the error, so it cannot be read as an error bar. This file owns the model that turns it into one:

    sigma^2 = scale^2 * spread^2 + floor^2 + size^2 * p^2 + reach^2 * r^2,    sigma <= 0.5

one (scale, floor, size, reach) per output column, fitted on the val split: first by maximising the
Gaussian likelihood of the residuals (prediction - truth), which says how sigma varies from galaxy
to galaxy, then scaled per output so that the larger of the misses of +-1 and +-2 sigma against 68%
and 95% of the val errors is as small as it can be (coverage_factor says why the likelihood alone
does not). p is the predicted vote fraction and r the predicted fraction of voters who reached its
question: the parent answer's column (Galaxy Zoo normalises a deeper question's answers to sum to
it), 1 for Q1 and Q6, which every voter answers (there the reach term is 0 and the floor does its
job). Per output, not per question: the answers of one question have errors of very different
size (Class1.3 "star or artifact" against Class1.1 "smooth").

Why p^2 and r^2: vote-fraction errors are heavy-tailed. Most galaxies never reach the deeper
questions (r near 0), so their deeper answers are near 0 and off by 0.01, while the few that do
are off by 0.1-0.2; an answer's error grows with its own size the same way. A width that follows
p and r per galaxy turns that mixture into errors of one scale, which one Gaussian width can cover
at both +-1 and +-2 sigma; one width for small and large deep answers alike covers too much at
+-1 sigma and too little at +-2. The form was chosen by cross-validation within the val split
(docs/usage.md has the figures). A calibration.json of another form (an older version's) is
refused, and predict.py fits it again. A single model without TTA has a spread of 0 and a sigma
of sqrt(floor^2 + size^2 p^2 + reach^2 r^2).

Intervals beside sigma: heavy tails that the p and r terms do not absorb (Q7-Q9's) still leave
+-1 sigma too wide and +-2 sigma too narrow for those questions. So the calibration also holds, per
output, interval_68 and interval_95: the multiples of sigma that make prediction +- interval_68 * sigma
hold 68.3% of the val errors (the level of +-1 sigma for a Gaussian) and prediction +- interval_95 *
sigma 95.4% (that of +-2 sigma). Each is the quantile of |error| / sigma pooled over the outputs of one
question (all its outputs' errors give a steadier quantile than one output's); for Gaussian errors they
are about 1 and 2. Chosen by 5-fold cross-validation within the val split against one factor for all
outputs and one per output (benchmarks/ACCURACY.md has the figures).

The fitted model is a small JSON-able dict (to_json / from_json, save / load as calibration.json)
that records its form and the setting its spread came from (members, TTA): the scale of a spread
over 16 views does not apply to a spread over 2. Also here: coverage of +-1 and +-2 sigma and of the
intervals, overall and per question, and the calibration curve (nominal Gaussian coverage against the
observed) with its plot.
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
# the form: a calibration.json of another form (an older version's) is refused by from_dict, so fitted again
FORM = ("sigma^2 = scale^2 * spread^2 + floor^2 + size^2 * p^2 + reach^2 * r^2, r = p of the parent answer, "
        "sigma <= max_sigma; intervals: prediction +- interval_68 (interval_95) * sigma")
MIN_FLOOR = 1e-3    # a sigma of 0 would make any nonzero error infinitely unlikely
MAX_SIGMA = 0.5     # the largest standard deviation a number in [0, 1] can have
TERMS = ("scale", "floor", "size", "reach")
# each output's parent column (the answer that leads to its question), -1 for Q1 and Q6's outputs
PARENT = np.array([LABEL_COLUMNS.index(q.parent) if q.parent else -1 for q in QUESTIONS for _ in q.columns])
# each interval and its coverage: that of +-1 and +-2 sigma for Gaussian errors
INTERVALS = {"interval_68": 100 * erf(1 / math.sqrt(2)), "interval_95": 100 * erf(2 / math.sqrt(2))}
QUESTION_COLUMNS = [[LABEL_COLUMNS.index(c) for c in q.columns] for q in QUESTIONS]
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


def reach(predictions):
    """(N, 37): the predicted fraction of voters who reached each output's question, its parent answer's
    vote fraction (in [0, 1]); 1 for Q1 and Q6, which every voter answers."""
    p = np.clip(predictions, 0.0, 1.0)
    return np.where(PARENT >= 0, p[:, np.maximum(PARENT, 0)], 1.0)


def variance_terms(predictions, spread):
    """(N, 37, 4): what each of scale^2, floor^2, size^2 and reach^2 multiplies in sigma^2. The reach term
    is 0 for Q1 and Q6: their reach is 1 for every galaxy, which the floor already is."""
    p = np.clip(predictions, 0.0, 1.0)
    return np.stack([spread ** 2, np.ones_like(p), p ** 2, np.where(PARENT >= 0, reach(p) ** 2, 0.0)], axis=-1)


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


def fit_variance(predictions, truth, spread, terms=TERMS):
    """(37, 4) maximum-likelihood (scale, floor, size, reach) for Gaussian residuals, each output on its own.

    A term that is 0 for every galaxy (no spread; reach of Q1 and Q6) or not in terms keeps a
    coefficient of 0; the floor is always fitted. With only the floor left, floor^2 is exactly the
    output's mean squared error.
    """
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown terms {sorted(unknown)}; the terms are {', '.join(TERMS)}")
    squared_errors = (predictions - truth) ** 2
    design = variance_terms(predictions, spread)
    used = (design.mean(0) > 0) & np.isin(TERMS, tuple(terms) + ("floor",))
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


def interval_factors(z):
    """{interval name: (37,) multiples of sigma}: for each question, the quantile of z = |error| / sigma
    over its outputs' galaxies at the interval's coverage (the next value up, so it holds at least that
    share of the errors it was fitted on)."""
    factors = {}
    for name, level in INTERVALS.items():
        factor = np.ones(NUM_OUTPUTS)
        for columns in QUESTION_COLUMNS:
            factor[columns] = np.quantile(z[:, columns], level / 100, method="higher")
        factors[name] = factor
    return factors


def interval_halfwidth(calibration, sigma, name):
    """(N, 37) half-width of each vote fraction's interval name ("interval_68" or "interval_95"): the
    prediction +- this holds that interval's share of the errors (INTERVALS)."""
    return np.asarray(calibration[name], np.float64) * sigma


def fit_calibration(predictions, truth, spread=None, members=1, tta=False, terms=TERMS, match_coverage=True):
    """The calibration (a dict, see the module docstring) fitted on one split, e.g. val.

    predictions, truth and spread are (N, 37); spread None means one model without TTA. members and
    tta record the setting the spread came from. terms are those of TERMS to fit (the floor always is;
    the others left out are 0). The Gaussian maximum-likelihood fit (fit_variance) says how sigma
    varies from galaxy to galaxy; match_coverage then widens or narrows each output's sigma by
    coverage_factor, which is folded into the coefficients and recorded as coverage_factor. With
    only the floor and no match_coverage, floor is exactly each output's RMSE.

    Beside the coefficients it holds interval_factors' interval_68 and interval_95 (the module
    docstring says why), fitted on the final sigma.

    The form was chosen by 5-fold cross-validation within val, by the largest coverage miss over
    +-1 / +-2 sigma, overall and per question, against p (1 - p), p, reach (1 - reach), p (reach - p),
    one factor per question and a log-linear sigma; p^2 alone did as well there, but not where errors
    follow the reach alone (tests/test_calibration.py).
    """
    predictions = as_outputs("predictions", predictions)
    truth = as_outputs("truth", truth, len(predictions))
    spread = spread_or_zero(spread, len(predictions))
    if len(predictions) < 2:
        raise ValueError(f"{len(predictions)} galaxies are too few to fit a calibration; fit it on the val split")
    params = fit_variance(predictions, truth, spread, terms)
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
    for name, factor in interval_factors(np.abs(predictions - truth) / sigma).items():
        calibration[name] = [round(float(v), 4) for v in factor]
    inside = {f"{k}sigma": within(predictions, sigma, truth, k) for k in (1, 2)}
    inside.update({name: within_interval(predictions, sigma, truth, calibration, name) for name in INTERVALS})
    calibration["fit_coverage"] = {name: round(float(hits.mean() * 100), 2) for name, hits in inside.items()}
    return calibration


def calibrated_sigma(calibration, predictions, spread=None):
    """(N, 37) calibrated standard deviation of each predicted vote fraction, in [MIN_FLOOR, max_sigma]."""
    predictions = as_outputs("predictions", predictions)
    spread = spread_or_zero(spread, len(predictions))
    squares = np.array([calibration[term] for term in TERMS], np.float64).T ** 2    # (37, 4)
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
    if data.get("form") != FORM:
        raise ValueError(f"{source} holds an older form of sigma than this version fits")
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
    for name in INTERVALS:
        values = data.get(name)
        values = np.asarray(values, np.float64) if isinstance(values, list) and all(
            isinstance(v, (int, float)) for v in values) else np.array([np.nan])
        if values.shape != (NUM_OUTPUTS,) or not np.isfinite(values).all() or (values <= 0).any():
            raise ValueError(f"{source}: {name} must be {NUM_OUTPUTS} finite numbers > 0")
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


def within_interval(predictions, sigma, truth, calibration, name):
    """(N, 37) bool: the truth lies within the calibration's interval name (interval_halfwidth)."""
    return np.abs(predictions - truth) <= interval_halfwidth(calibration, sigma, name)


def checked(predictions, sigma, truth):
    predictions = as_outputs("predictions", predictions)
    return predictions, as_outputs("sigma", sigma, len(predictions)), as_outputs("truth", truth, len(predictions))


def coverage_table(predictions, sigma, truth, calibration=None):
    """Percent of vote fractions within +-1 and +-2 sigma, over all 37 outputs and per question, as a
    DataFrame: rows "all", "Q1" ... "Q11"; columns question, text, nominal_1sigma, observed_1sigma,
    nominal_2sigma, observed_2sigma, and with a calibration observed_interval_68 and observed_interval_95,
    the percent within its intervals (their nominal coverage is that of +-1 and +-2 sigma)."""
    predictions, sigma, truth = checked(predictions, sigma, truth)
    inside = {k: within(predictions, sigma, truth, k) for k in (1, 2)}
    if calibration is not None:
        inside.update({name: within_interval(predictions, sigma, truth, calibration, name) for name in INTERVALS})
    parts = [("all", "all 37 outputs", list(range(NUM_OUTPUTS)))]
    parts += [(f"Q{q.number}", q.text, columns) for q, columns in zip(QUESTIONS, QUESTION_COLUMNS)]
    rows = []
    for name, text, columns in parts:
        row = {"question": name, "text": text}
        for k in (1, 2):
            row[f"nominal_{k}sigma"] = round(float(nominal_coverage(k)), 1)
            row[f"observed_{k}sigma"] = float(inside[k][:, columns].mean() * 100) if len(predictions) else math.nan
        for name in INTERVALS if calibration is not None else ():
            row[f"observed_{name}"] = float(inside[name][:, columns].mean() * 100) if len(predictions) else math.nan
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


def plot_calibration(curves, path, title="Calibration of the predicted sigma", intervals=None):
    """Nominal against observed coverage with the y = x line, one line per {label: calibration_curve}, and
    a star per {label: (nominal, observed)} of intervals, as the PNG path (written as it is: the caller
    picks a temporary name when it must be atomic)."""
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 100], [0, 100], color="gray", ls="--", label="y = x (calibrated)")
    for label, curve in curves.items():
        ax.plot(curve["nominal"], curve["observed"], "o-", ms=3, label=label)
    for label, (nominal, observed) in (intervals or {}).items():
        ax.plot([nominal], [observed], "*", ms=11, label=label)
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
