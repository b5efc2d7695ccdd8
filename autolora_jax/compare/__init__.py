"""Compares the fine-tuning methods over seeds, and vanilla RFT's sensitivity to its hyper-parameters.

    python -m autolora_jax.compare --config=configs/demo.py --methods=autolora,vanilla_rft,pgd_at \
        --seeds=0,1,2 --workdir=DIR [--config.KEY=VALUE ...]
    python -m autolora_jax.compare --config=configs/demo.py --sweep --seeds=0 --workdir=DIR
    autolora-compare --config=demo --seeds=0 --workdir=DIR   # the installed command: configs by name

Why: the paper's claim is that AutoLoRa matches or beats vanilla RFT without a hyper-parameter search. One
run says little (robust accuracy moves by a point or more between seeds), so the comparison runs every
method with several seeds and reports the mean and the spread; the sweep shows how much vanilla RFT depends
on its learning rate and KL weight, and AutoLoRa on the one number it starts from (its initial learning rate).

What: every (method, seed) is an ordinary run (`train.train_and_evaluate`) of a copy of the config with
`config.method` and `config.seed` set, in its own workdir DIR/<method>/seed<k>; the sweep's vanilla RFT runs
(`config.fixed.lr`, `config.fixed.l2`) live in DIR/sweep/lr<lr>_l2<l2>/seed<k>, its AutoLoRa runs over
`config.auto_lr.lr0` in DIR/sweep/autolora_lr0_<lr0>/seed<k> (the config's own lr0: the comparison's
DIR/autolora/seed<k>). All of them share `config.pretrain.cache_dir = DIR/pretrain`, so every
method and seed starts from the same pre-trained FE. A run whose results.json holds its test numbers is
skipped (its numbers are read); an unfinished one resumes, since calling `train_and_evaluate` on its
workdir again resumes it. So running the same command again after any stop continues where it stopped.

Outputs in DIR: comparison.json / .md / .png (per method: each seed's test SA, PGD-10 and AutoAttack of the
best and the final checkpoint, their mean and sample standard deviation over seeds, the wall time per run and
the compute behind each number: `budget`)
and, with --sweep, sensitivity.json / .md / .png.

The modules: plan (the methods, seeds and sweep grid; one `Job` per run), runner (skipping, resuming and
running the jobs: `run_all`, `run_sweep`, with an injectable `runner`), summary (`summarize`,
`summarize_sweep`, `markdown`, `sensitivity_markdown`), paper (the paper's Table 2), plots
(`plot_comparison`, `plot_sensitivity`), study (`compare`, what the command does) and cli (the command).
Their names are importable from here.
"""

from autolora_jax.compare.cli import main, run_cli
from autolora_jax.compare.paper import PAPER_DATASET_NAMES, PAPER_METHODS, PAPER_TABLE2
from autolora_jax.compare.plan import (
                                       DEFAULT_METHODS,
                                       DEFAULT_SEEDS,
                                       METHOD_NAMES,
                                       PRETRAIN_DIR,
                                       SWEEP_L2S,
                                       SWEEP_LR0S,
                                       SWEEP_LRS,
                                       SWEEP_METHOD,
                                       SWEEP_SEEDS,
                                       Job,
                                       default_methods,
                                       lr0_label,
                                       number_label,
                                       parse_methods,
                                       parse_seeds,
                                       parse_values,
                                       plan_comparison,
                                       plan_lr0_sweep,
                                       plan_sweep,
                                       run_config,
                                       sweep_label,
)
from autolora_jax.compare.plots import plot_comparison, plot_sensitivity, sensitivity_series
from autolora_jax.compare.runner import (
                                       Runner,
                                       check_jobs,
                                       execute,
                                       group_results,
                                       is_finished,
                                       read_results,
                                       run_all,
                                       run_sweep,
)
from autolora_jax.compare.study import COMPARISON_FILES, SENSITIVITY_FILES, compare, write_comparison, write_sensitivity
from autolora_jax.compare.summary import (
                                       CHECKPOINTS,
                                       EXTRA_METRICS,
                                       METRIC_NAMES,
                                       METRICS,
                                       STD_NOTE,
                                       budget,
                                       describe_config,
                                       format_budget,
                                       format_pm,
                                       format_seconds,
                                       markdown,
                                       mean_std,
                                       sensitivity_markdown,
                                       summarize,
                                       summarize_sweep,
)

__all__ = [
    'CHECKPOINTS', 'COMPARISON_FILES', 'DEFAULT_METHODS', 'DEFAULT_SEEDS', 'EXTRA_METRICS', 'Job',
    'METHOD_NAMES', 'METRICS', 'METRIC_NAMES', 'PAPER_DATASET_NAMES', 'PAPER_METHODS', 'PAPER_TABLE2',
    'PRETRAIN_DIR', 'Runner', 'SENSITIVITY_FILES', 'STD_NOTE', 'SWEEP_L2S', 'SWEEP_LR0S', 'SWEEP_LRS',
    'SWEEP_METHOD', 'SWEEP_SEEDS', 'budget', 'check_jobs', 'compare', 'default_methods', 'describe_config',
    'execute', 'format_budget', 'format_pm', 'format_seconds', 'lr0_label', 'plan_lr0_sweep',
    'sensitivity_series', 'group_results', 'is_finished', 'main', 'markdown', 'mean_std', 'number_label',
    'parse_methods', 'parse_seeds', 'parse_values', 'plan_comparison', 'plan_sweep', 'plot_comparison',
    'plot_sensitivity', 'read_results', 'run_all', 'run_config', 'run_cli', 'run_sweep',
    'sensitivity_markdown', 'summarize', 'summarize_sweep', 'sweep_label', 'write_comparison',
    'write_sensitivity',
]
