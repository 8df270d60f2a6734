"""The console commands an install provides (pyproject.toml's [project.scripts]): each runs one of the
repository's command-line tools exactly as ``python TOOL.py`` does, with the same error boundary
(a user mistake is one line and exit status 2, utils.cli.run_main)."""

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a clone (python script/entry.py) as well as installed
    sys.path.insert(0, str(REPO))

from utils.cli import run_main  # noqa: E402

# command name -> the module whose main(argv) it runs; "script." is this folder, installed as
# double_win_script (its name in a clone is script/)
COMMANDS = {
    "dwl-find-tickets": "main_imp_pretrain",
    "dwl-transfer": "main_downstream",
    "dwl-sweep": "script.sweep",
    "dwl-demo": "script.demo",
    "dwl-plot-curves": "analysis.plot_curves",
    "dwl-mask-stats": "analysis.mask_stats",
    "dwl-robustness": "analysis.robustness",
    "dwl-loss-landscape": "analysis.loss_landscape",
    "dwl-export-ticket": "analysis.export_ticket",
    "dwl-compare-verdicts": "analysis.compare_verdicts",
    "dwl-sources-needed": "analysis.sources_needed",
    "dwl-paper-vs-ours": "analysis.paper_vs_ours",
    "dwl-plot-companion": "analysis.plot_companion",
}


def _module(name):
    if name.startswith("script."):  # a sibling of this file, in whichever package this folder is
        package = __name__.rpartition(".")[0]
        if package:
            return importlib.import_module(f"{package}.{name.split('.', 1)[1]}")
        sys.path.insert(0, str(Path(__file__).parent))
        name = name.split(".", 1)[1]
    return importlib.import_module(name)


def run(command, argv=None):
    """Run ``command`` (a key of COMMANDS) on ``argv`` (default: the process's arguments); its exit status."""
    status = run_main(_module(COMMANDS[command]).main, argv)
    return 0 if status is None else status


def find_tickets():
    sys.exit(run("dwl-find-tickets"))


def transfer():
    sys.exit(run("dwl-transfer"))


def sweep():
    sys.exit(run("dwl-sweep"))


def demo():
    sys.exit(run("dwl-demo"))


def plot_curves():
    sys.exit(run("dwl-plot-curves"))


def mask_stats():
    sys.exit(run("dwl-mask-stats"))


def robustness():
    sys.exit(run("dwl-robustness"))


def loss_landscape():
    sys.exit(run("dwl-loss-landscape"))


def export_ticket():
    sys.exit(run("dwl-export-ticket"))


def compare_verdicts():
    sys.exit(run("dwl-compare-verdicts"))


def sources_needed():
    sys.exit(run("dwl-sources-needed"))


def paper_vs_ours():
    sys.exit(run("dwl-paper-vs-ours"))


def plot_companion():
    sys.exit(run("dwl-plot-companion"))
