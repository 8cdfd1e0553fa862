//! The cost model's memory side against the engine, and `auto` end to end: planned peaks bound
//! the measured ones, declared limits are held, and the planner (through the real
//! `flexbench-native plan`) resolves an auto case that then runs within its limits.

use backend_native::device::cpu::CpuOptions;
use backend_native::policy::{self, cost};
use backend_native::runner;
use bench_core::auto::Auto;
use bench_core::memory::{ByteSize, MemoryLimits};
use bench_core::{Backend, Case, Device, Placement, Policy, RunContext};

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("flexbench-policy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn case(percent: [u8; 6], cpu_attention: bool) -> Case {
    let mut p = Policy::new(percent);
    p.cpu_attention = cpu_attention;
    Case {
        prompt_len: 8,
        gen_len: 4,
        gpu_batch_size: 4,
        num_gpu_batches: 2,
        placement: Placement::Policy(p),
        device: Device::Cpu,
        ..Case::example("native")
    }
}

#[test]
fn planned_peaks_bound_the_measured_ones() {
    let dir = temp("peaks");
    let cfg = bench_core::model::lookup("opt-tiny").unwrap();
    for (percent, cpu_attention) in [
        ([0, 0, 100, 0, 100, 0], false),
        ([30, 30, 50, 25, 100, 0], false),
        ([0, 50, 0, 0, 0, 100], true),
        ([20, 20, 0, 100, 0, 100], true),
        ([50, 0, 0, 50, 100, 0], false),
    ] {
        let c = Case {
            model: "opt-tiny".into(),
            ..case(percent, cpu_attention)
        };
        let planned = cost::planned_peak(
            &policy::workload(&c, &cfg),
            &cost::WeightSplit::of(&cfg, &c.placement.policy()),
            &policy::candidate(&c),
        );
        let r = runner::run_case(&c, CpuOptions::default(), Some(&dir)).unwrap();
        for (tier, plan) in [
            ("compute", planned.compute),
            ("host", planned.host),
            ("disk", planned.disk),
        ] {
            let measured = r.peak_memory_bytes[tier];
            assert!(
                measured <= plan,
                "{}: measured {tier} peak {measured} over the planned {plan}",
                c.placement.label()
            );
        }
    }
}

#[test]
fn declared_limits_are_held_and_unresolved_cases_refused() {
    let dir = temp("limits");
    let mut c = case([0, 0, 100, 0, 100, 0], false);
    c.memory = Some(MemoryLimits {
        compute: Some(ByteSize(1 << 20)),
        ..Default::default()
    });
    let e = format!(
        "{:#}",
        runner::run_case(&c, CpuOptions::default(), Some(&dir)).unwrap_err()
    );
    assert!(
        e.contains("on the compute tier, over its limit of 1.0 MiB")
            && e.contains("memory.compute"),
        "{e}"
    );
    let mut c = case([100, 0, 100, 0, 100, 0], false);
    c.placement = Placement::Auto;
    c.auto = Some(Auto {
        placement: true,
        ..Default::default()
    });
    let e = format!(
        "{:#}",
        runner::run_case(&c, CpuOptions::default(), Some(&dir)).unwrap_err()
    );
    assert!(e.contains("unresolved"), "{e}");
}

/// One test in this file sets the environment: the planner child reads it.
#[test]
fn auto_resolves_through_the_planner_and_runs_within_its_limits() {
    std::env::set_var(policy::MACHINE_ENV, "flexllmgen-t4");
    let dir = temp("auto");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_flexbench-native"))
        .parent()
        .unwrap()
        .to_path_buf();
    let ctx = RunContext {
        project_root: dir.clone(),
        case_file: dir.join("cases").join("x.json"),
        work_dir: dir.join("work").join("x"),
        cache_dir: dir.clone(),
        bin_dir: bin,
        python: None,
    };
    let mut c = case([100, 0, 100, 0, 100, 0], false);
    c.placement = Placement::Auto;
    c.gpu_batch_size = 2;
    c.num_gpu_batches = 1;
    c.auto = Some(Auto {
        placement: true,
        ..Default::default()
    });
    let limits = MemoryLimits {
        compute: Some(ByteSize(200 << 20)),
        host: Some(ByteSize(64 << 20)),
        disk: Some(ByteSize(1 << 30)),
    };
    c.memory = Some(limits);
    let backend = backend_native::NativeBackend;
    let r = backend.resolve(&c, &ctx).unwrap();
    assert!(!r.unresolved());
    assert_eq!(r.id(), c.id(), "the record keeps the requested id");
    let Placement::Policy(p) = &r.placement else {
        panic!("resolved to {:?}", r.placement)
    };
    // 250 MB of weights do not fit 200 + 64 MiB within the margin: some go to disk
    assert!(p.weights().2 > 0, "{}", p.label());
    let res = r.auto.as_ref().unwrap().resolved.as_ref().unwrap();
    assert!(res.profile.as_deref().unwrap().contains("flexllmgen-t4"));
    let pred = res.predicted.unwrap();
    assert!(pred.total_throughput > 0.0 && pred.prefill_latency_s > 0.0);
    let peak = res.planned_peak.unwrap();
    assert!(peak.compute as f64 <= 0.9 * (200u64 << 20) as f64);
    assert!(peak.host as f64 <= 0.9 * (64u64 << 20) as f64);
    assert_eq!(r.gpu_batch_size, 2, "a fixed batch stays");
    // the resolved case runs, and its measured peaks stay within the limits
    std::fs::create_dir_all(&ctx.work_dir).unwrap();
    let out = runner::run_case(&r, CpuOptions::default(), Some(&ctx.work_dir)).unwrap();
    for (tier, l) in [
        ("compute", limits.compute),
        ("host", limits.host),
        ("disk", limits.disk),
    ] {
        assert!(out.peak_memory_bytes[tier] <= l.unwrap().0, "{tier}");
    }
    assert!(
        out.predicted.is_some(),
        "the runner predicts with the named profile too"
    );
    // nothing fits (the batch left to the planner too): refused with the smallest limits that would
    c.auto.as_mut().unwrap().gpu_batch_size = true;
    c.gpu_batch_size = 1;
    c.memory = Some(MemoryLimits {
        compute: Some(ByteSize(1 << 20)),
        host: Some(ByteSize(1 << 20)),
        disk: Some(ByteSize(0)),
    });
    let e = backend.resolve(&c, &ctx).unwrap_err();
    assert!(
        e.contains("no policy of opt-125m") && e.contains("smallest limits"),
        "{e}"
    );
}
