//! `cargo xtask list`: the suites, the backends, and whether each backend can run here.

use anyhow::Result;
use bench_core::{suite, Frameworks, RunContext, Suite};

#[derive(clap::Args)]
pub struct Args {
    /// Python interpreter the hf and deepspeed backends would use.
    #[arg(long, value_name = "PATH")]
    pub python: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let backends = crate::backends::registry();
    let frameworks = Frameworks::of(&backends);
    let dir = crate::suites_dir();
    println!("Suites ({}):", dir.display());
    let names = suite::available(&dir);
    if names.is_empty() {
        println!("  none");
    }
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    for name in &names {
        match Suite::load(
            &dir.join(format!("{name}.{}", suite::SUITE_EXT)),
            &frameworks,
        ) {
            Ok(s) => println!(
                "  {name:<width$}  {:>3} cases  {}",
                s.expand().len(),
                s.description
            ),
            Err(e) => println!(
                "  {name:<width$}  INVALID: {}",
                format!("{e:#}").replace('\n', " ")
            ),
        }
    }

    let ctx = RunContext {
        project_root: crate::project_root(),
        case_file: std::env::temp_dir().join("flexbench-list-case.json"),
        work_dir: std::env::temp_dir(),
        cache_dir: bench_core::dirs::cache_dir(),
        bin_dir: crate::release_bin_dir(),
        python: args.python,
    };
    println!("\nBackends:");
    for b in &backends {
        let status = match b.probe(&ctx) {
            Ok(()) => "available".to_string(),
            Err(why) => format!("unavailable: {why}"),
        };
        println!(
            "  {:<10} frameworks: {:<20} {status}",
            b.name(),
            b.frameworks().join(", ")
        );
    }
    Ok(())
}
