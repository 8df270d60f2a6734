"""Test-wide settings, and the quick tier.

Tiny models gain nothing from intra-op threads, and two OpenMP threads per process on a 2-core
machine shared with subprocess tests spin against each other (10x slow-downs seen), so every
test process, and every subprocess a test starts, uses one thread.

``python -m pytest -m quick``: a check to run after every change (under 2 minutes on 2 cores), the
tests in QUICK below. Together they import and exercise every module of the project;
tests/test_quick_tier.py holds the module -> test map and checks it. The full suite (what CI runs)
is ``python -m pytest -q``; docs/development.md says when to run which.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# "file::test" (every parametrization of the test) or "file" (every test of the file)
QUICK = (
    "test_bench_grid_scale.py::test_bad_arguments_are_one_line",
    "test_gpu_suite.py::test_gpu_table_marks_missed_and_met_targets",
    "test_sweep_stage1.py::test_a_multi_gpu_job_gets_slots_on_different_gpus",
    "test_sweep_stage1.py::test_bad_stage1_entries_are_one_line_naming_the_entry",
    "test_grid_cell_flags.py::test_each_run_gets_flags_then_its_cells_entries_in_file_order",
    "test_sweep_stage1.py::test_plan_lists_every_run_before_theta_p_and_tickets_exist",
    "test_folder_uint8.py::test_crop_boxes_are_torchvisions_draw_for_draw",
    "test_folder_uint8.py::test_gpu_decode_falls_back_to_the_cpu_path_with_one_line",
    "test_folder_uint8.py::test_grayscale_cmyk_and_png_named_jpeg_come_out_rgb",
    "test_study_report.py::test_a_study_folder_stands_for_its_grid_files_in_the_papers_order",
    "test_quick_tier.py::test_console_commands_resolve_to_a_main",
    "test_sweep_cost.py::test_bench_record_gives_known_hours",
    "test_cost_flops.py::test_the_walk_knows_every_architecture_as_models_builds_it",
    "test_robustbench_tensorboard.py::test_stage1_refuses_tensorboard_where_nothing_trains",
    "test_figures_style.py",
    "test_verdict.py",
    "test_records.py",
    "test_rundir.py",
    "test_compare_verdicts.py",
    "test_sources_needed.py",
    "test_analysis.py::test_double_win_table_known_answer",
    "test_analysis.py::test_bad_inputs_raise_user_error",
    "test_analysis.py::test_mask_stats_iou_and_zero_kernels",
    "test_analysis_robustness.py::test_directions_follow_mask_and_filter_norms",
    "test_analysis_robustness.py::test_projection_recovers_known_coordinates",
    "test_analysis_robustness.py::test_robustness_bad_inputs",
    "test_analysis_robustness.py::test_loss_landscape_bad_inputs",
    "test_analysis_hardening.py::test_a_damaged_verdict_table_is_one_line",
    "test_analysis_hardening.py::test_a_damaged_results_json_alone_is_one_line_in_every_tool",
    "test_companion.py::test_match_bench_rules",
    "test_companion.py::test_version_1_ticket_reads_as_unstructured",
    "test_paper_vs_ours.py::test_agreement_labels",
    "test_paper_vs_ours.py::test_a_bad_table_is_one_line",
    "test_attacks.py::test_linf_result_in_ball_and_image_range",
    "test_attacks.py::test_threat_model_validates",
    "test_attacks.py::test_one_rule_for_unset_attack_sizes",
    "test_attacks.py::test_attack_accuracy_clean_and_attacked",
    "test_precision.py::test_peak_table_tells_the_h100_variants_apart",
    "test_precision.py::test_estimate_counts_validated_epochs_and_refuses_wrong_records",
    "test_precision.py::test_benchmarks_write_records",
    "test_export.py::test_im2col_conv_matches_the_conv",
    "test_export.py::test_inference_benchmark_record_is_well_formed",
    "test_export.py::test_export_never_overwrites_what_it_reads_and_names_a_file_that_is_no_ticket",
    "test_fidelity.py::test_eval_from_follows_the_protocol_when_called_directly",
    "test_fidelity.py::test_eval_precision_benchmark_compares_fp32_and_bf16_on_one_model",
    "test_dataset.py::test_cifar10_reader_shapes_labels_and_pixel_order",
    "test_dataset.py::test_crafted_pickle_is_refused_and_not_executed",
    "test_dataset.py::test_digits_arrays_and_fixed_stratified_split",
    "test_dataset.py::test_data_rate_subset_is_class_balanced_and_seeded",
    "test_dataset.py::test_tensor_loader_output_shape_dtype_and_range",
    "test_dataset.py::test_resumed_epoch_yields_the_batches_of_an_uninterrupted_one",
    "test_dataset.py::test_crop_resize_matches_torchvision_resized_crop",
    "test_dataset.py::test_build_data_on_digits_and_classes_subset",
    "test_dataset.py::test_folder_loaders_follow_the_same_interface",
    "test_models.py::test_resnet_tiny_widths_and_torchvision_names",
    "test_models.py::test_own_format_round_trip",
    "test_models.py::test_code_running_pickle_is_refused",
    "test_models.py::test_head_of_other_shape_is_dropped_in_auto_mode",
    "test_pruning.py::test_global_prune_removes_the_smallest_kept_weights",
    "test_pruning.py::test_mask_enforcer_keeps_pruned_weights_zero_under_momentum_and_decay",
    "test_pruning.py::test_ticket_round_trip",
    "test_pruning.py::test_channel_masks_remove_whole_filters_and_never_a_whole_layer",
    "test_pruning.py::test_nm_masks_keep_exactly_n_of_every_m",
    "test_pruning.py::test_statistics_on_hand_made_masks",
    "test_lmp.py::test_top_k_mask_keeps_exactly_k_even_with_ties",
    "test_lmp.py::test_scored_network_is_theta_p_under_the_mask_and_passes_gradient_to_pruned_scores",
    "test_loop.py::test_hooks_in_order_and_what_each_checkpoint_holds",
    "test_loop.py::test_a_stop_inside_an_epoch_resumes_there_and_ends_as_an_uninterrupted_run",
    "test_hardening_stages.py::test_chance_bound_is_two_points_above_one_over_classes",
    "test_hardening.py::test_out_of_range_flags_are_refused_by_stage2",
    "test_hardening.py::test_out_of_range_flags_are_refused_by_stage1",
    "test_flags.py::test_flag_applies_answers_for_a_grid_flag",
    "test_flags.py::test_a_usage_error_is_one_line_with_a_pointer_to_help",
    "test_downstream.py::test_paper_defaults_and_seed_spellings_parse",
    "test_imp.py::test_random_pruning_levels_and_metadata",
    "test_grids.py::test_fig3_imp_st_from_three_pretrainings_and_rp_from_at_only",
    "test_sweep.py::test_expected_runs_and_rounds_axis",
    "test_sweep.py::test_slurm_time_parsing",
    "test_sweep_hardening.py::test_a_flag_that_is_no_flag_names_the_nearest",
    "test_sweep_hardening.py::test_a_config_json_with_null_fields_is_stale_not_done",
    "test_progress.py",
    "test_quick_tier.py",
    "test_layout.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path, _, name = item.nodeid.partition("::")
        test = name.split("[")[0]
        filename = path.rsplit("/", 1)[-1]
        if filename in QUICK or f"{filename}::{test}" in QUICK:
            item.add_marker(pytest.mark.quick)


def pytest_ignore_collect(collection_path, config):
    """With ``-m quick`` alone, files holding no quick test are not even imported (collecting every
    file imports most of the project and costs tens of seconds on 2 cores)."""
    if config.getoption("markexpr", "") != "quick" or collection_path.suffix != ".py":
        return None
    name = collection_path.name
    if not name.startswith("test_"):
        return None
    return not any(q == name or q.startswith(name + "::") for q in QUICK) or None
