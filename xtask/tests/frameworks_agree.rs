//! Frameworks side by side: the same case (same dummy weights, same prompts, fp32 on the CPU)
//! through HF Accelerate and through DeepSpeed ZeRO-3 with CPU offload must give the same greedy
//! tokens: partitioning the parameters must not change a single one; nor may loading the
//! checkpoint from HuggingFace-style shards (as dummy checkpoints of large models are written).
//! Here because only xtask sees every backend (no backend crate depends on another).

use std::time::Duration;

use backend_deepspeed::DeepSpeedBackend;
use backend_hf::HfBackend;
use bench_core::protocol::find_result;
use bench_core::run::execute::run_alone;
use bench_core::{testkit, Placement};

#[test]
fn deepspeed_zero3_and_sharded_checkpoints_match_hf_tokens() {
    let ctx = |t: &str| testkit::ctx(&xtask::project_root(), env!("CARGO_TARGET_TMPDIR"), t);
    let (ds_ctx, hf_ctx) = (ctx("agree-ds"), ctx("agree-hf"));
    if !testkit::python_ready(&DeepSpeedBackend, &ds_ctx)
        || !testkit::python_ready(&HfBackend, &hf_ctx)
    {
        return;
    }
    let cfg = bench_core::model::lookup("opt-tiny-odd").unwrap();
    let sharded = bench_core::checkpoint::ensure_dummy_checkpoint_in_shards(
        &ds_ctx.cache_dir.join("sharded"),
        &cfg,
        bench_core::dummy::DEFAULT_SEED,
        60_000,
    )
    .unwrap();
    assert!(sharded.join("model.safetensors.index.json").is_file());
    let tokens = |backend: &dyn bench_core::Backend, ctx, framework, placement, shards: bool| {
        let mut case = testkit::small_case("opt-tiny-odd", framework, placement);
        if shards {
            case.weights = bench_core::Weights::Checkpoint(sharded.clone());
        }
        let out = run_alone(backend, &case, ctx, Duration::from_secs(600)).unwrap();
        assert!(out.status.unwrap().success(), "{framework}: {}", out.stderr);
        find_result(&out.stdout).unwrap().unwrap().tokens.unwrap()
    };
    let ds = tokens(
        &DeepSpeedBackend,
        &ds_ctx,
        "deepspeed",
        Placement::Cpu,
        true,
    );
    let hf = tokens(&HfBackend, &hf_ctx, "hf", Placement::Gpu, false);
    assert_eq!(ds, hf, "DeepSpeed on the shards, HF on the single file");
    let hf_shards = tokens(&HfBackend, &hf_ctx, "hf", Placement::Disk, true);
    assert_eq!(hf_shards, hf, "HF's disk offload on the shards");
}
