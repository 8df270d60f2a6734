"""The quick tier (``python -m pytest -m quick``) covers every module of the project: each module
has a quick test that exercises it, named below, and the test's file imports the module (directly
or through the modules it imports) or runs it by its path. A new module fails this check until a
quick test for it is named here. Also: quick tests for the two modules whose other tests are all
slow (study/local.py, script/demo.py)."""

import ast
import functools
import importlib.util
from pathlib import Path

from tests import conftest
from tests.test_layout import REPO, graph, imports_of, module_name, project_files

# module -> the quick test that exercises it ("file::test" or "file": every test of the file)
COVERAGE = {
    "benchmarks/bench_grid_scale.py": "test_bench_grid_scale.py::test_bad_arguments_are_one_line",
    "benchmarks/gpu_table.py": "test_gpu_suite.py::test_gpu_table_marks_missed_and_met_targets",
    "study/gridfile.py": "test_sweep_stage1.py::test_bad_stage1_entries_are_one_line_naming_the_entry",
    "study/cellflags.py": "test_grid_cell_flags.py::test_each_run_gets_flags_then_its_cells_entries_in_file_order",
    "study/stage1.py": "test_sweep_stage1.py::test_plan_lists_every_run_before_theta_p_and_tickets_exist",
    "study/stage1_progress.py": "test_sweep_stage1.py::test_plan_lists_every_run_before_theta_p_and_tickets_exist",
    "study/pipeline.py": "test_sweep_stage1.py::test_a_multi_gpu_job_gets_slots_on_different_gpus",
    "data_loading/folder_common.py": "test_folder_uint8.py::test_grayscale_cmyk_and_png_named_jpeg_come_out_rgb",
    "data_loading/folder_uint8.py": "test_folder_uint8.py::test_crop_boxes_are_torchvisions_draw_for_draw",
    "data_loading/folder_nvjpeg.py": "test_folder_uint8.py::test_gpu_decode_falls_back_to_the_cpu_path_with_one_line",
    "analysis/study_report.py": "test_study_report.py::test_a_study_folder_stands_for_its_grid_files_in_the_papers_order",
    "script/entry.py": "test_quick_tier.py::test_console_commands_resolve_to_a_main",
    "study/cost.py": "test_sweep_cost.py::test_bench_record_gives_known_hours",
    "study/flops.py": "test_cost_flops.py::test_the_walk_knows_every_architecture_as_models_builds_it",
    "training/tensorboard.py": "test_robustbench_tensorboard.py::test_stage1_refuses_tensorboard_where_nothing_trains",
    "analysis/__init__.py": "test_analysis.py::test_double_win_table_known_answer",
    "analysis/common.py": "test_analysis.py::test_bad_inputs_raise_user_error",
    "analysis/companion_runs.py": "test_companion.py::test_version_1_ticket_reads_as_unstructured",
    "analysis/compare_verdicts.py": "test_compare_verdicts.py",
    "analysis/export_ticket.py": "test_export.py::test_export_never_overwrites_what_it_reads_and_names_a_file_that_is_no_ticket",
    "analysis/loss_landscape.py": "test_analysis_robustness.py::test_directions_follow_mask_and_filter_norms",
    "analysis/mask_stats.py": "test_analysis.py::test_mask_stats_iou_and_zero_kernels",
    "analysis/paper_vs_ours.py": "test_paper_vs_ours.py::test_agreement_labels",
    "analysis/plot_companion.py": "test_companion.py::test_match_bench_rules",
    "analysis/plot_curves.py": "test_figures_style.py",
    "analysis/robustness.py": "test_analysis_robustness.py::test_robustness_bad_inputs",
    "analysis/sources_needed.py": "test_sources_needed.py",
    "analysis/runs.py": "test_analysis.py::test_double_win_table_known_answer",
    "analysis/style.py": "test_figures_style.py",
    "analysis/table.py": "test_analysis.py::test_double_win_table_known_answer",
    "analysis/verdict.py": "test_verdict.py",
    "attacks.py": "test_attacks.py::test_linf_result_in_ball_and_image_range",
    "benchmarks/__init__.py": "test_precision.py::test_benchmarks_write_records",
    "benchmarks/_common.py": "test_precision.py::test_benchmarks_write_records",
    "benchmarks/_machine.py": "test_precision.py::test_benchmarks_write_records",
    "benchmarks/bench_eval_precision.py": "test_fidelity.py::test_eval_precision_benchmark_compares_fp32_and_bf16_on_one_model",
    "benchmarks/bench_inference.py": "test_export.py::test_inference_benchmark_record_is_well_formed",
    "benchmarks/bench_loader.py": "test_precision.py::test_benchmarks_write_records",
    "benchmarks/bench_step.py": "test_precision.py::test_benchmarks_write_records",
    "benchmarks/estimate_run.py": "test_precision.py::test_estimate_counts_validated_epochs_and_refuses_wrong_records",
    "data_loading/__init__.py": "test_dataset.py::test_build_data_on_digits_and_classes_subset",
    "data_loading/augment.py": "test_dataset.py::test_crop_resize_matches_torchvision_resized_crop",
    "data_loading/batching.py": "test_dataset.py::test_resumed_epoch_yields_the_batches_of_an_uninterrupted_one",
    "data_loading/catalog.py": "test_dataset.py::test_build_data_on_digits_and_classes_subset",
    "data_loading/folder_loader.py": "test_dataset.py::test_folder_loaders_follow_the_same_interface",
    "data_loading/readers.py": "test_dataset.py::test_cifar10_reader_shapes_labels_and_pixel_order",
    "data_loading/safe_unpickle.py": "test_dataset.py::test_crafted_pickle_is_refused_and_not_executed",
    "data_loading/splits.py": "test_dataset.py::test_data_rate_subset_is_class_balanced_and_seeded",
    "data_loading/streams.py": "test_dataset.py::test_tensor_loader_output_shape_dtype_and_range",
    "data_loading/tensor_loader.py": "test_dataset.py::test_tensor_loader_output_shape_dtype_and_range",
    "dataset.py": "test_dataset.py::test_build_data_on_digits_and_classes_subset",
    "main_downstream.py": "test_downstream.py::test_paper_defaults_and_seed_spellings_parse",
    "main_imp_pretrain.py": "test_imp.py::test_random_pruning_levels_and_metadata",
    "masks/__init__.py": "test_pruning.py::test_ticket_round_trip",
    "masks/channel.py": "test_pruning.py::test_channel_masks_remove_whole_filters_and_never_a_whole_layer",
    "masks/enforce.py": "test_pruning.py::test_mask_enforcer_keeps_pruned_weights_zero_under_momentum_and_decay",
    "masks/family.py": "test_sweep.py::test_expected_runs_and_rounds_axis",
    "masks/learned.py": "test_lmp.py::test_scored_network_is_theta_p_under_the_mask_and_passes_gradient_to_pruned_scores",
    "masks/nm.py": "test_pruning.py::test_nm_masks_keep_exactly_n_of_every_m",
    "masks/patterns.py": "test_pruning.py::test_nm_masks_keep_exactly_n_of_every_m",
    "masks/prunable.py": "test_pruning.py::test_global_prune_removes_the_smallest_kept_weights",
    "masks/stats.py": "test_pruning.py::test_statistics_on_hand_made_masks",
    "masks/ticket.py": "test_pruning.py::test_ticket_round_trip",
    "masks/unstructured.py": "test_pruning.py::test_global_prune_removes_the_smallest_kept_weights",
    "models/__init__.py": "test_models.py::test_resnet_tiny_widths_and_torchvision_names",
    "models/export.py": "test_export.py::test_im2col_conv_matches_the_conv",
    "models/pretrained.py": "test_models.py::test_head_of_other_shape_is_dropped_in_auto_mode",
    "models/resnet.py": "test_models.py::test_resnet_tiny_widths_and_torchvision_names",
    "pruning_utils.py": "test_pruning.py::test_global_prune_removes_the_smallest_kept_weights",
    "script/demo.py": "test_quick_tier.py::test_demo_schedules_and_transfer_grid",
    "script/sweep.py": "test_sweep_hardening.py::test_a_flag_that_is_no_flag_names_the_nearest",
    "study/__init__.py": "test_sweep.py::test_expected_runs_and_rounds_axis",
    "study/grid.py": "test_grids.py::test_fig3_imp_st_from_three_pretrainings_and_rp_from_at_only",
    "study/local.py": "test_quick_tier.py::test_local_backend_runs_a_task_in_process_and_logs_it",
    "study/rundirs.py": "test_sweep_hardening.py::test_a_config_json_with_null_fields_is_stale_not_done",
    "study/slurm.py": "test_sweep.py::test_slurm_time_parsing",
    "study/status.py": "test_sweep_hardening.py::test_a_config_json_with_null_fields_is_stale_not_done",
    "training/__init__.py": "test_loop.py::test_hooks_in_order_and_what_each_checkpoint_holds",
    "training/chance.py": "test_hardening_stages.py::test_chance_bound_is_two_points_above_one_over_classes",
    "training/common_args.py": "test_flags.py::test_flag_applies_answers_for_a_grid_flag",
    "training/downstream_args.py": "test_flags.py::test_flag_applies_answers_for_a_grid_flag",
    "training/engine.py": "test_loop.py::test_hooks_in_order_and_what_each_checkpoint_holds",
    "training/lmp.py": "test_lmp.py::test_top_k_mask_keeps_exactly_k_even_with_ties",
    "training/loop.py": "test_loop.py::test_a_stop_inside_an_epoch_resumes_there_and_ends_as_an_uninterrupted_run",
    "training/setup.py": "test_fidelity.py::test_eval_from_follows_the_protocol_when_called_directly",
    "utils/__init__.py": "test_records.py",
    "utils/checkpoint.py": "test_models.py::test_own_format_round_trip",
    "utils/cli.py": "test_flags.py::test_a_usage_error_is_one_line_with_a_pointer_to_help",
    "utils/distributed.py": "test_loop.py::test_hooks_in_order_and_what_each_checkpoint_holds",
    "utils/errors.py": "test_records.py",
    "utils/preemption.py": "test_loop.py::test_a_stop_inside_an_epoch_resumes_there_and_ends_as_an_uninterrupted_run",
    "utils/progress.py": "test_progress.py",
    "utils/records.py": "test_records.py",
    "utils/rundir.py": "test_rundir.py",
    "utils/seeding.py": "test_imp.py::test_random_pruning_levels_and_metadata",
}


class _Edges(dict):
    """The import graph, hashable by identity so that _reached can be cached."""

    __hash__ = object.__hash__


def _file_and_test(entry):
    filename, _, test = entry.partition("::")
    return REPO / "tests" / filename, test


def _is_quick(entry):
    filename, _, _ = entry.partition("::")
    return entry in conftest.QUICK or filename in conftest.QUICK


@functools.lru_cache(maxsize=None)
def _functions(path):
    return {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.FunctionDef)}


def test_every_quick_entry_names_a_test_that_exists():
    for entry in conftest.QUICK:
        path, test = _file_and_test(entry)
        assert path.is_file(), entry
        if test:
            assert test in _functions(path), f"{entry}: no such test (renamed? update tests/conftest.py QUICK)"


def test_every_module_has_a_quick_test_that_reaches_it():
    modules = {str(f) for f in project_files()}
    assert set(COVERAGE) == modules, ("modules without a quick test (name one in COVERAGE and QUICK): "
                                      f"{sorted(modules - set(COVERAGE))}; gone: {sorted(set(COVERAGE) - modules)}")
    edges = _Edges(graph())
    for module, entry in COVERAGE.items():
        assert _is_quick(entry), f"{module}: {entry} is not in the quick tier (tests/conftest.py QUICK)"
        path, test = _file_and_test(entry)
        reached = set(_reached(path, test, frozenset(modules), edges))
        name = module_name(Path(module))
        if module.endswith("__init__.py"):  # a package is imported with any of its modules
            reached |= {r.rsplit(".", 1)[0] for r in reached}
        assert name in reached, f"{module}: {entry} neither imports nor runs it"


@functools.lru_cache(maxsize=None)
def _reached(path, test, modules, edges):
    """The project modules a test file imports, runs or loads by path (a string naming the file), and
    everything those import in turn. In this file, whose map names every module, only the named test
    function's own strings count."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    if path.resolve() == Path(__file__).resolve():
        (tree,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == test]
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    todo = [module_name(Path(m)) for m in modules if m in strings or Path(m).name in strings]
    todo += imports_of(path.relative_to(REPO), set(edges))
    reached = set()
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo.extend(edges.get(m, ()))
    return frozenset(reached)


# --------------------------------------------------------------------------- modules whose other tests are slow

def _load_script(relpath):
    spec = importlib.util.spec_from_file_location(f"quick_{Path(relpath).stem}", REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_schedules_and_transfer_grid():
    demo = _load_script("script/demo.py")
    full, quick = demo.settings(False), demo.settings(True)
    assert len(full["seeds"]) == 5 and len(quick["seeds"]) == 2 and quick["rounds"] < full["rounds"]
    assert (full["replicas"], quick["replicas"]) == (3, 2)
    cells = demo.cell_flags(full)
    scarce = next(c for c in cells if c.get("data_rate") == 0.1)["flags"]
    assert scarce == {"epochs": full["scarce_epochs"], "milestones": [18], "eval_from": 12}
    assert "dense" not in next(c for c in cells if "allow_chance" in c["flags"])["method"]  # dense runs stay checked
    jobs = [("at", "imp", Path("tickets/at_imp"), [], 4), ("std", "omp", Path("tickets/std_omp_channel"),
                                                            ["--pattern", "channel"], 3)]
    grid = demo.transfer_grid(full, jobs)
    # a replicated stage-1 entry's directory stands for its replicates; channel tickets are listed one each
    assert grid["pretrain"]["at"]["tickets"] == ["tickets/at_imp"] and grid["pretrain"]["fat"]["tickets"] == []
    assert grid["pretrain"]["std"]["tickets"] == [[f"tickets/std_omp_channel/r{i}" for i in (1, 2, 3)]]
    assert grid["pretrain"]["at"]["init"] == [f"source/at/r{i}/model_best.pt" for i in (1, 2, 3)]
    assert grid["axes"]["seed"] == [1, 2, 3, 4, 5] and grid["cell_flags"] == cells


def test_local_backend_runs_a_task_in_process_and_logs_it(tmp_path):
    from study import local
    from study.rundirs import LOG_NAME

    task = local.Task("main_downstream", ["--dataset", "digits", "--no-such-flag"], tmp_path / "run")
    assert not task.done and "main_downstream.py" in task.command()
    assert local.call_in_process(task, 1) == 2  # a bad flag: the stage's exit status for bad input
    log = (tmp_path / "run" / LOG_NAME).read_text()
    assert "attempt 1" in log and "--no-such-flag" in log


def test_console_commands_resolve_to_a_main():
    """pyproject.toml's console commands (script/entry.py) each name a module with a main(argv)."""
    entry = _load_script("script/entry.py")
    for command, module in entry.COMMANDS.items():
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), (command, module)
        assert "def main(" in path.read_text(encoding="utf-8"), (command, module)
