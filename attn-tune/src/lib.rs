//! Tuning at install: finds every variant declared with `attn::attention!` in the program, tunes
//! each over a shape grid on the default device, prints what it chose, and fills the persistent
//! cache that later processes read (see `attn::tune`).
//!
//! Use it from your own crate: add `attn-tune` as a dependency and a binary
//! (`src/bin/attn-tune.rs`) containing `fn main() -> std::process::ExitCode { attn_tune::main() }`;
//! run it once per machine (`cargo run --release --bin attn-tune`), e.g. in the install step.

#![warn(missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use attn::tune::{self, cache, Grid, KeyReport, Registration};
use attn::ComputeClient;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "attn-tune",
    about = "Tune attn variants for this device and cache the winners"
)]
pub struct Cli {
    /// What to do (default: tune).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Tune every registered variant (or those named) over the grid; write the cache.
    Tune(TuneArgs),
    /// List the registered variants and their candidates on this device.
    List,
    /// Where the cache is and what it holds for this device.
    Status,
    /// Write the cache into a bundle file for identical machines.
    Export {
        /// The bundle file to write.
        out: PathBuf,
    },
    /// Copy a bundle's entries into this machine's cache.
    Import {
        /// The bundle file to read.
        bundle: PathBuf,
    },
    /// Delete the cache.
    Clear,
}

/// Options of `tune`.
#[derive(clap::Args, Debug, Default)]
pub struct TuneArgs {
    /// Only these variants (by name; repeatable).
    #[arg(long = "variant")]
    pub variants: Vec<String>,
    /// `default` (per device) or `quick` (one small shape).
    #[arg(long, default_value = "default")]
    pub grid: String,
    /// Sequence lengths, replacing the grid's (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub seq: Vec<usize>,
    /// Sequences × query heads, replacing the grid's (comma-separated).
    #[arg(long = "batch-heads", value_delimiter = ',')]
    pub batch_heads: Vec<usize>,
    /// Timed runs of the winner and the fallback for the report.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Also write the report as tab-separated values.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs the command line of this process; the exit code says whether everything succeeded.
pub fn main() -> ExitCode {
    // What the library decides goes through `tracing`; the command shows its warnings (a cache
    // moved aside, a cache of other devices only, a missing fast path) on stderr.
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attn-tune: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), String> {
    let command = cli.command.unwrap_or(Command::Tune(TuneArgs::default()));
    match command {
        Command::Tune(args) => tune_all(&args),
        Command::List => {
            let client = attn::default_client();
            println!("device: {}", client.properties().identity.name);
            for r in tune::registered() {
                let names = match tune::candidates(&client, &r.spec, true) {
                    Ok(list) => list
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    Err(e) => format!("(none: {e})"),
                };
                println!("{:<24} {:<40} {}", r.spec.name, describe(r), names);
            }
            Ok(())
        }
        Command::Status => {
            let client = attn::default_client();
            let s = cache::summary(&client);
            println!("cache: {}", cache::path().display());
            println!("device: {}", client.hardware_identity());
            println!("tuned for this device: {}", s.ours);
            println!("tuned for other devices or cubecl versions: {}", s.foreign);
            println!("tuning records: {}", s.records);
            println!("other cubecl entries: {}", s.other);
            Ok(())
        }
        Command::Export { out } => {
            let manifest = cache::export(&out).map_err(|e| e.to_string())?;
            println!(
                "wrote {} (cubecl {}, from {})",
                out.display(),
                manifest.cubecl_version,
                cache::path().display()
            );
            Ok(())
        }
        Command::Import { bundle } => {
            let report = cache::import(&bundle).map_err(|e| e.to_string())?;
            println!(
                "imported {} entries ({} already present, {} failed) into {}",
                report.imported,
                report.skipped,
                report.failed,
                cache::path().display()
            );
            Ok(())
        }
        Command::Clear => {
            cache::clear().map_err(|e| e.to_string())?;
            println!("cleared {}", cache::path().display());
            Ok(())
        }
    }
}

fn describe(r: &Registration) -> String {
    let s = &r.spec;
    format!(
        "{} d{}{} {}",
        s.dtype.name(),
        s.head_dim,
        if s.value_dim != s.head_dim {
            format!("/{}", s.value_dim)
        } else {
            String::new()
        },
        s.mask.describe()
    )
}

/// The grid `args` ask for on `client`'s device.
fn grid(client: &ComputeClient, args: &TuneArgs) -> Result<Grid, String> {
    let mut grid = match args.grid.as_str() {
        "default" => Grid::default_for(client),
        "quick" => Grid::quick(),
        other => return Err(format!("unknown grid `{other}` (default, quick)")),
    };
    if !args.seq.is_empty() {
        grid.seqs = args.seq.clone();
    }
    if !args.batch_heads.is_empty() {
        grid.batch_heads = args.batch_heads.clone();
    }
    if let Some(samples) = args.samples {
        grid.samples = samples;
    }
    if grid.seqs.contains(&0) || grid.batch_heads.contains(&0) {
        return Err("sequence lengths and batch×heads must be at least 1".into());
    }
    Ok(grid)
}

fn tune_all(args: &TuneArgs) -> Result<(), String> {
    let started = Instant::now();
    // Tuning is the point here, on every device (calls on CPU-emulated ones skip it by default).
    tune::set_policy(tune::Policy::Tune);
    let client = attn::default_client();
    let grid = grid(&client, args)?;
    let all = tune::registered();
    for name in &args.variants {
        if !all.iter().any(|r| r.spec.name == name) {
            let known: Vec<&str> = all.iter().map(|r| r.spec.name).collect();
            return Err(format!(
                "no variant `{name}` in this program (found: {})",
                known.join(", ")
            ));
        }
    }
    let chosen: Vec<&Registration> = all
        .into_iter()
        .filter(|r| args.variants.is_empty() || args.variants.iter().any(|n| n == r.spec.name))
        .collect();
    if chosen.is_empty() {
        return Err(
            "no variants declared with attn::attention! are linked into this program".into(),
        );
    }
    cache::init();
    cache::warn_if_foreign(&client);
    println!(
        "attn-tune: {} variants on {} · grid: N {:?} × B·H {:?} · cache {}",
        chosen.len(),
        client.properties().identity.name,
        grid.seqs,
        grid.batch_heads,
        cache::path().display()
    );
    let points: usize = chosen.iter().map(|r| grid.points(&r.spec).len()).sum();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(points as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut reports: Vec<KeyReport> = Vec::new();
    let mut failures = Vec::new();
    for r in &chosen {
        bar.set_message(r.spec.name);
        let mut on_point = |report: &KeyReport| {
            // `suspend` prints above a visible bar, and prints at all under a hidden one.
            bar.suspend(|| println!("{}", line(report)));
            bar.inc(1);
        };
        match (r.tune)(&client, &grid, &mut on_point) {
            Ok(mut done) => reports.append(&mut done),
            Err(e) => {
                bar.suspend(|| println!("{:<20} failed: {e}", r.spec.name));
                failures.push(format!("{}: {e}", r.spec.name));
            }
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.report {
        write_report(path, &reports).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let total = started.elapsed().as_secs_f64();
    let settle: f64 = reports.iter().map(|r| r.settle_s).sum();
    println!(
        "attn-tune: {} keys in {total:.1} s ({settle:.1} s settling keys); cache {}",
        reports.len(),
        cache::path().display()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} variants failed: {}",
            failures.len(),
            failures.join("; ")
        ))
    }
}

/// One report line: variant, shape, winner and its time per key, fallback, settle time.
fn line(r: &KeyReport) -> String {
    format!(
        "{:<20} {:<22} {:<20} {:>9.3} ms {:>8.2} µs/key | fallback {:<20} {:>9.3} ms ×{:.2} | {} candidates, settled in {:.2} s",
        r.variant,
        r.point.describe(),
        r.chosen.to_string(),
        r.chosen_ms,
        r.chosen_ms * 1e3 / r.keys.max(1) as f64,
        r.fallback.to_string(),
        r.fallback_ms,
        r.fallback_ms / r.chosen_ms.max(1e-9),
        r.candidates,
        r.settle_s
    )
}

fn write_report(path: &PathBuf, reports: &[KeyReport]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    writeln!(
        f,
        "variant\tbatch\theads_q\theads_kv\tseq\tchosen\tchosen_ms\tfallback\tfallback_ms\tcandidates\tsettle_s"
    )?;
    for r in reports {
        writeln!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}\t{:.4}\t{}\t{:.4}\t{}\t{:.3}",
            r.variant,
            r.point.batch,
            r.point.heads_q,
            r.point.heads_kv,
            r.point.seq,
            r.chosen,
            r.chosen_ms,
            r.fallback,
            r.fallback_ms,
            r.candidates,
            r.settle_s
        )?;
    }
    Ok(())
}
