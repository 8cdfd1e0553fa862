//! Frameworks side by side: the same case (same dummy weights, same prompts, fp32 on the CPU)
//! through HF Accelerate and through DeepSpeed ZeRO-3 with CPU offload must give the same greedy
//! tokens: partitioning the parameters must not change a single one. Here because only xtask
//! sees every backend (no backend crate depends on another).

use std::time::Duration;

use backend_deepspeed::DeepSpeedBackend;
use backend_hf::HfBackend;
use bench_core::protocol::find_result;
use bench_core::run::execute::run_alone;
use bench_core::{testkit, Placement};

#[test]
fn deepspeed_zero3_matches_hf_tokens() {
    let ctx = |t: &str| testkit::ctx(&xtask::project_root(), env!("CARGO_TARGET_TMPDIR"), t);
    let (ds_ctx, hf_ctx) = (ctx("agree-ds"), ctx("agree-hf"));
    if !testkit::python_ready(&DeepSpeedBackend, &ds_ctx)
        || !testkit::python_ready(&HfBackend, &hf_ctx)
    {
        return;
    }
    let tokens = |backend: &dyn bench_core::Backend, ctx, framework, placement| {
        let case = testkit::small_case("opt-tiny-odd", framework, placement);
        let out = run_alone(backend, &case, ctx, Duration::from_secs(600)).unwrap();
        assert!(out.status.unwrap().success(), "{framework}: {}", out.stderr);
        find_result(&out.stdout).unwrap().unwrap().tokens.unwrap()
    };
    let ds = tokens(&DeepSpeedBackend, &ds_ctx, "deepspeed", Placement::Cpu);
    let hf = tokens(&HfBackend, &hf_ctx, "hf", Placement::Gpu);
    assert_eq!(ds, hf);
}
