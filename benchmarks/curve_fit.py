"""bench.py curve's fit and figure: RMSE(N) = a + b N^-c fitted by bounded least squares to the mixed
curve's test RMSE (8-fold TTA, the mean over seeds at each N), extrapolated to Kaggle's 61,578 training
galaxies with an interval from a bootstrap over the test galaxies, and learning_curve.png. The best
recipe's few points get a and b of their own under the mixed curve's exponent c (the same scaling with
data, offset), bootstrapped over the same resamples of the test galaxies."""
import json
from pathlib import Path
import warnings

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
from matplotlib.ticker import FuncFormatter, NullLocator
import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from galaxy.files import atomic_write

KAGGLE_N = 61_578       # galaxies in Kaggle's training set
RESAMPLES = 1000
N_SCALE = 1000.0        # the fit works in thousands of galaxies: b then stays near the RMSE's size
# Single models trained on all of Kaggle's training set, scored on its test set (leaderboard RMSE)
KAGGLE_ANCHORS = (
    (0.0769, "Kaggle 1st place, best single model (69x69 views)", "tab:red", "-"),
    (0.0774, "3M-parameter CNN, 128x128, public PyTorch reimplementation", "tab:purple", "--"),
    (0.0814, "Kaggle 2nd place, single network", "tab:brown", "-."),
)
CURVE_STYLE = {"mixed": ("tab:blue", "o", "flips_40 (212 px, flips, 40 epochs): subset + selected galaxies"),
               "sample_only": ("tab:orange", "s", "flips_40: the subset's galaxies only"),
               "best_recipe": ("tab:green", "D", "160 px, rotate/zoom/shift, 80 epochs: subset + selected")}


def power_law(n, a, b, c):
    return a + b * np.power(n, -c)


def fit_power_law(n, y, start=None):
    """(a, b, c) of the least-squares fit of a + b n^-c to the points, with a >= 0, b > 0, 0 < c < 2.
    Tries a few starting exponents (or start, an earlier fit) and keeps the best; RuntimeError if none fits."""
    # in units of thousands of galaxies and of the mean RMSE: every parameter then starts near 1
    scale = float(np.mean(y))
    x, y = np.asarray(n, np.float64) / N_SCALE, np.asarray(y, np.float64) / scale
    if start is not None:
        a, b, c = start
        starts = [(a / scale, b / scale / N_SCALE ** c, c)]
    else:
        a0 = 0.9 * y.min()
        starts = [(a0, max((y.max() - a0) * x.min() ** c0, 1e-6), c0) for c0 in (0.3, 0.7, 1.2)]
    best, best_error = None, np.inf
    for p0 in starts:
        p0 = (max(p0[0], 0.0), max(p0[1], 1e-9), min(max(p0[2], 1e-3), 1.99))   # strictly inside the bounds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(power_law, x, y, p0=p0, bounds=([0, 1e-12, 1e-6], [np.inf, np.inf, 2]),
                                      maxfev=20000, ftol=1e-12, xtol=1e-12, gtol=1e-12)
        except (RuntimeError, ValueError):
            continue
        error = np.sum((power_law(x, *params) - y) ** 2)
        if error < best_error:
            best, best_error = params, error
    if best is None:
        raise RuntimeError("no power law fits these points")
    a, b, c = best
    return float(a * scale), float(b * scale * N_SCALE ** c), float(c)   # b' (n/S)^-c = b' S^c n^-c


def size_means(per_galaxy, sizes):
    """(distinct sizes, RMSE at each: the mean over its points of each point's RMSE) from the per-galaxy
    mean squared errors per point (P, galaxies)."""
    rmse = np.sqrt(per_galaxy.mean(axis=-1))
    distinct = np.unique(sizes)
    return distinct, np.array([rmse[..., sizes == n].mean(-1) for n in distinct]).T


def fit_with_exponent(n, y, c):
    """(a, b) of the least-squares fit of a + b n^-c to the points for a given c: a straight line in n^-c."""
    x = np.power(np.asarray(n, np.float64), -c)
    b, a = np.polyfit(x, np.asarray(y, np.float64), 1)
    return float(a), float(b)


def galaxy_resamples(n_galaxies, resamples=RESAMPLES, seed=0):
    """Index arrays of resamples of the test galaxies with replacement, the same for every curve."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_galaxies, n_galaxies) for _ in range(resamples)]


def bootstrap_fits(per_galaxy, sizes, start, resamples=RESAMPLES, seed=0, draws=None):
    """(fits (B, 3) of each resample of the test galaxies (the same galaxies for every point), failed count).
    draws: the resamples' index arrays, when another fit must use the same ones."""
    per_galaxy, sizes = np.asarray(per_galaxy, np.float64), np.asarray(sizes)
    fits, failed = [], 0
    for chosen in draws if draws is not None else galaxy_resamples(per_galaxy.shape[1], resamples, seed):
        distinct, rmse = size_means(per_galaxy[:, chosen], sizes)
        try:
            fits.append(fit_power_law(distinct, rmse, start))
        except RuntimeError:
            failed += 1
    return np.array(fits).reshape(-1, 3), failed


def interval(values, level):
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def curve_errors(points, results):
    """(points, test galaxies): each point's per-galaxy mean squared error over the 37 outputs."""
    return np.stack([np.load(Path(results) / point / "test_squared_error.npy").mean(1)
                     for point in points]).astype(np.float64)


def fit_curve(rows, results, resamples=RESAMPLES):
    """Fit the mixed curve's points in rows (learning_curve.csv's table) and bootstrap its extrapolation;
    print the result and write results/fit.json. None, with a message, below 3 distinct sizes."""
    mixed = rows[rows["curve"] == "mixed"]
    if mixed["n_train"].nunique() < 3:
        print(f"fit skipped: the mixed curve has points at {mixed['n_train'].nunique()} sizes; fitting a + b N^-c "
              f"needs 3 or more")
        return None
    per_galaxy = curve_errors(mixed["point"], results)
    sizes = mixed["n_train"].to_numpy()
    distinct, rmse = size_means(per_galaxy, sizes)
    a, b, c = fit_power_law(distinct, rmse)
    draws = galaxy_resamples(per_galaxy.shape[1], resamples)   # shared with the best recipe's fit
    fits, failed = bootstrap_fits(per_galaxy, sizes, (a, b, c), draws=draws)
    at_kaggle = power_law(KAGGLE_N, *fits.T)
    fit = {"formula": "RMSE(N) = a + b * N**(-c)", "curve": "mixed", "metric": "test RMSE with 8-fold TTA, "
           "the mean over seeds at each N", "a": a, "b": b, "c": c, "sizes": distinct.tolist(),
           "rmse": rmse.round(5).tolist(), "points": len(mixed), "n_test": per_galaxy.shape[1],
           "extrapolate_to": KAGGLE_N, "rmse_at": power_law(KAGGLE_N, a, b, c),
           "interval_68": interval(at_kaggle, 0.68), "interval_95": interval(at_kaggle, 0.95),
           "bootstrap": {"resamples": resamples, "failed": failed, "over": "the test galaxies"},
           "note": "the interval is the test galaxies' sampling error alone: not the seeds' spread, nor whether "
                   "the power law holds beyond the measured sizes"}
    recipe = rows[rows["curve"] == "best_recipe"]
    if recipe["n_train"].nunique() >= 2 and not failed:
        fit["best_recipe"] = fit_recipe(curve_errors(recipe["point"], results), recipe["n_train"].to_numpy(),
                                        c, fits[:, 2], draws)
    atomic_write(Path(results) / "fit.json", lambda tmp: Path(tmp).write_text(json.dumps(fit, indent=1) + "\n"))
    print(f"fit: RMSE(N) = {a:.4f} + {b:.4g} N^-{c:.3f} over {len(distinct)} sizes ({len(mixed)} points); "
          f"at N = {KAGGLE_N:,}: {fit['rmse_at']:.4f} (68%: {fit['interval_68'][0]:.4f}-{fit['interval_68'][1]:.4f}, "
          f"95%: {fit['interval_95'][0]:.4f}-{fit['interval_95'][1]:.4f}; {resamples} resamples of the "
          f"{per_galaxy.shape[1]} test galaxies{f', {failed} failed' if failed else ''}); saved "
          f"{Path(results) / 'fit.json'}")
    if "best_recipe" in fit:
        r = fit["best_recipe"]
        print(f"best recipe, the same c: RMSE(N) = {r['a']:.4f} + {r['b']:.4g} N^-{c:.3f} over {len(r['sizes'])} "
              f"sizes; at N = {KAGGLE_N:,}: {r['rmse_at']:.4f} (68%: {r['interval_68'][0]:.4f}-"
              f"{r['interval_68'][1]:.4f}, 95%: {r['interval_95'][0]:.4f}-{r['interval_95'][1]:.4f})")
    return {**fit, "fits": fits}


def fit_recipe(per_galaxy, sizes, c, resampled_c, draws):
    """The best recipe's points (per_galaxy errors at sizes) fitted with the mixed curve's c, a and b their
    own; each bootstrap resample (draws, the mixed curve's) fitted with that resample's c."""
    distinct, rmse = size_means(per_galaxy, sizes)
    a, b = fit_with_exponent(distinct, rmse, c)
    at_kaggle = []
    for chosen, c_resampled in zip(draws, resampled_c):
        a_r, b_r = fit_with_exponent(*size_means(per_galaxy[:, chosen], sizes), c_resampled)
        at_kaggle.append(power_law(KAGGLE_N, a_r, b_r, c_resampled))
    return {"a": a, "b": b, "c": c, "sizes": distinct.tolist(), "rmse": rmse.round(5).tolist(),
            "points": len(sizes), "rmse_at": power_law(KAGGLE_N, a, b, c),
            "interval_68": interval(at_kaggle, 0.68), "interval_95": interval(at_kaggle, 0.95),
            "note": "the mixed curve's exponent c, a and b fitted to these points: the same scaling with data"}


def draw_figure(rows, fit, path):
    """learning_curve.png: each curve's points (one per seed, a line through their means), the fit, its
    extrapolation to KAGGLE_N with the bootstrap's 68% and 95% bands, Kaggle's single models on the full
    set and predicting the mean."""
    fig = Figure(figsize=(10, 8))
    ax = fig.add_subplot()
    for curve, (color, marker, label) in CURVE_STYLE.items():
        points = rows[rows["curve"] == curve]
        if not len(points):
            continue
        ax.scatter(points["n_train"], points["test_rmse_tta"], color=color, marker=marker, s=18, alpha=0.45)
        means = points.groupby("n_train")["test_rmse_tta"].mean()
        ax.plot(means.index, means.to_numpy(), color=color, marker=marker, label=label)
    low = rows["n_train"].min()
    if fit is not None:
        grid = np.geomspace(low, KAGGLE_N, 200)
        bands = power_law(grid[None, :], *(fit["fits"].T[:, :, None]))
        for level, alpha in ((0.95, 0.12), (0.68, 0.25)):
            ax.fill_between(grid, *np.percentile(bands, [(1 - level) * 50, 100 - (1 - level) * 50], axis=0),
                            color="tab:blue", alpha=alpha, lw=0, label=f"{level:.0%} bootstrap band")
        ax.plot(grid, power_law(grid, fit["a"], fit["b"], fit["c"]), color="tab:blue", ls=":",
                label=f"fit to flips_40, subset + selected: {fit['a']:.4f} + {fit['b']:.3g} $N^{{-{fit['c']:.2f}}}$")
        lo, hi = fit["interval_68"]
        ax.errorbar([KAGGLE_N], [fit["rmse_at"]], yerr=[[fit["rmse_at"] - lo], [hi - fit["rmse_at"]]],
                    color="tab:blue", marker="*", ms=12, capsize=4,
                    label=f"extrapolated to {KAGGLE_N:,}: {fit['rmse_at']:.4f} (68%: {lo:.4f}-{hi:.4f})")
    if fit is not None and "best_recipe" in fit:
        recipe, color = fit["best_recipe"], CURVE_STYLE["best_recipe"][0]
        grid = np.geomspace(min(recipe["sizes"]), KAGGLE_N, 100)
        ax.plot(grid, power_law(grid, recipe["a"], recipe["b"], recipe["c"]), color=color, ls=":",
                label=f"fit to 160 px, rzs, 80 epochs, flips_40's exponent: {recipe['a']:.4f} + {recipe['b']:.3g} "
                      f"$N^{{-{recipe['c']:.2f}}}$")
        lo, hi = recipe["interval_68"]
        ax.errorbar([KAGGLE_N * 1.06], [recipe["rmse_at"]],   # beside the mixed curve's star
                    yerr=[[recipe["rmse_at"] - lo], [hi - recipe["rmse_at"]]], color=color, marker="*", ms=12,
                    capsize=4,
                    label=f"extrapolated to {KAGGLE_N:,}: {recipe['rmse_at']:.4f} (68%: {lo:.4f}-{hi:.4f})")
    for value, label, color, style in KAGGLE_ANCHORS:
        ax.axhline(value, color=color, ls=style, lw=1, label=f"{label}, full training set: {value}")
    mean_rmse = rows.loc[rows["n_train"].idxmax(), "mean_rmse"]
    ax.axhline(mean_rmse, color="gray", ls="--", lw=1, label=f"predict the mean: {mean_rmse:.4f}")
    ax.axvline(KAGGLE_N, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(low / 1.3, KAGGLE_N * 1.3)
    ticks = [t for t in (10, 30, 100, 300, 1000, 3000, 10000, 30000) if low / 1.3 <= t <= KAGGLE_N / 1.5]
    ax.set_xticks(ticks + [KAGGLE_N])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_xlabel("training galaxies N (log scale; 61,578 = Kaggle's whole training set)")
    ax.set_ylabel("test RMSE over the 37 vote fractions (8-fold TTA)")
    n_test = f"{fit['n_test']} " if fit is not None else ""
    ax.set_title(f"Test RMSE against training galaxies, on the same {n_test}test galaxies of the 3,000-galaxy subset\n"
                 f"(small markers: one seed each; lines join their means)", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print(f"saved {path}")
