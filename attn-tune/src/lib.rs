//! Tuning at install: finds every variant declared with `attn::attention!` in the program, tunes
//! each over a shape grid on the default device, prints what it chose, and fills the persistent
//! cache that later processes read (see `attn::tune`).
//!
//! Use it from your own crate: add `attn-tune` as a dependency and a binary
//! (`src/bin/attn-tune.rs`) containing `fn main() -> std::process::ExitCode { attn_tune::main() }`;
//! run it once per machine (`cargo run --release --bin attn-tune`), e.g. in the install step. Or
//! carry it as a subcommand of the program itself ([`main_from`]): compiled kernels are kept per
//! binary, so tuning from the binary that serves leaves its first process nothing to compile.

#![warn(missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use attn::tune::{
    self, cache, BackwardReport, DecodePoint, DecodeReport, Grid, KeyReport, Registration, Shape,
};
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
    Tune(Box<TuneArgs>),
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
#[derive(clap::Args, Clone, Debug, Default)]
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
    /// Also tune the backward pass's plan at every point (for programs that train).
    #[arg(long)]
    pub backward: bool,
    /// Decode: sequences per batch, replacing the grid's (comma-separated).
    #[arg(long = "decode-batch", value_delimiter = ',')]
    pub decode_batch: Vec<usize>,
    /// Decode: cached tokens per sequence, replacing the grid's (comma-separated).
    #[arg(long = "decode-len", value_delimiter = ',')]
    pub decode_len: Vec<usize>,
    /// Decode: paged caches of this many tokens per page (default: contiguous caches).
    #[arg(long = "page-size")]
    pub page_size: Option<usize>,
    /// Decode: caches storing K and V in e4m3 (`KvCache::paged_fp8` / `contiguous_fp8`).
    #[arg(long)]
    pub fp8: bool,
    /// No decode points.
    #[arg(long = "no-decode")]
    pub no_decode: bool,
    /// The shapes a deployment sees, one per line, replacing the grid's: `prefill B Hq N` or
    /// `decode B Hq N [query tokens]` (`#` starts a comment).
    #[arg(long)]
    pub shapes: Option<PathBuf>,
    /// Tune the shapes that calls under `ATTN_TUNE=deferred` found untuned and recorded (the
    /// cache folder's `misses.txt`), for the variants they name unless `--variant` is given, then
    /// empty the file.
    #[arg(long, conflicts_with = "shapes")]
    pub misses: bool,
    /// Also write the report as tab-separated values.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs the command line of this process; the exit code says whether everything succeeded.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs the command line `args` (the program's name first), as [`main`] does with the process's:
/// for a program that carries the tuner as a subcommand of its own binary, so that the kernels
/// tuning compiles are kept under that binary's build id and its later processes load them
/// (`myserver attn-tune tune` at install: `attn_tune::main_from(std::env::args_os().skip(1))`).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // What the library decides goes through `tracing`; the command shows its warnings (a cache
    // moved aside, a cache of other devices only, a missing fast path) on stderr, unless the
    // program that carries it has its own subscriber.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
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
    let command = cli.command.unwrap_or(Command::Tune(Box::default()));
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
    grid.backward = args.backward;
    if grid.seqs.contains(&0) || grid.batch_heads.contains(&0) {
        return Err("sequence lengths and batch×heads must be at least 1".into());
    }
    if !args.decode_batch.is_empty() || !args.decode_len.is_empty() {
        let (mut batches, mut lens) = (Vec::new(), Vec::new());
        for p in &grid.decode {
            if !batches.contains(&p.sequences) {
                batches.push(p.sequences);
            }
            if !lens.contains(&p.keys) {
                lens.push(p.keys);
            }
        }
        let batches = pick(&args.decode_batch, batches, &[1]);
        let lens = pick(&args.decode_len, lens, &[256]);
        if batches.contains(&0) || lens.contains(&0) {
            return Err("decode batches and lengths must be at least 1".into());
        }
        grid.decode = DecodePoint::cross(&batches, &lens);
    }
    if let Some(page) = args.page_size {
        if !(16..=attn::MAX_PAGE_SIZE).contains(&page) {
            return Err(format!(
                "--page-size {page}: pages hold 16 to {} tokens",
                attn::MAX_PAGE_SIZE
            ));
        }
        grid.page_size = Some(page);
    }
    grid.fp8 = args.fp8;
    let misses = args.misses.then(cache::misses_path);
    if let Some(path) = args.shapes.as_ref().or(misses.as_ref()) {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Deferred backward calls record their shape with a note that asks for the backward pass.
        grid.backward |= args.misses && text.contains("(backward");
        let (prefill, decode) =
            parse_shapes(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        grid.shapes = prefill;
        grid.decode = decode;
        if grid.shapes.is_empty() {
            // Only decode shapes: no prefill points.
            grid.seqs.clear();
        }
    }
    if args.no_decode {
        grid.decode.clear();
    }
    Ok(grid)
}

/// The values given on the command line, else the grid's, else `default`.
fn pick(given: &[usize], grid: Vec<usize>, default: &[usize]) -> Vec<usize> {
    if !given.is_empty() {
        given.to_vec()
    } else if !grid.is_empty() {
        grid
    } else {
        default.to_vec()
    }
}

/// The variants a misses file names (the first word of each line's comment), each once.
pub fn missed_variants(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for line in text.lines() {
        let name = line
            .split_once('#')
            .and_then(|(_, comment)| comment.split_whitespace().next());
        if let Some(name) = name {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Reads a shapes file: `prefill B Hq N` and `decode B Hq N [query tokens]` lines, blank lines
/// and `#` comments; an error names the line.
pub fn parse_shapes(text: &str) -> Result<(Vec<Shape>, Vec<DecodePoint>), String> {
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: String| format!("line {}: {e} (`{}`)", i + 1, raw.trim());
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or("");
        let numbers: Vec<usize> = words
            .map(|w| {
                w.parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| at(format!("`{w}` is not a positive whole number")))
            })
            .collect::<Result<_, _>>()?;
        match (kind, numbers.as_slice()) {
            ("prefill", &[batch, heads_q, seq]) => prefill.push(Shape {
                batch,
                heads_q,
                seq,
            }),
            ("decode", &[sequences, heads_q, keys])
            | ("decode", &[sequences, heads_q, keys, _]) => decode.push(DecodePoint {
                sequences,
                heads_q: Some(heads_q),
                keys,
                tokens: numbers.get(3).copied().unwrap_or(1),
            }),
            ("prefill", _) => return Err(at("expected `prefill B Hq N`".into())),
            ("decode", _) => return Err(at("expected `decode B Hq N [query tokens]`".into())),
            (other, _) => return Err(at(format!("unknown kind `{other}` (prefill or decode)"))),
        }
    }
    if prefill.is_empty() && decode.is_empty() {
        return Err("no shapes".into());
    }
    Ok((prefill, decode))
}

fn tune_all(args: &TuneArgs) -> Result<(), String> {
    let started = Instant::now();
    // Tuning is the point here, on every device (calls on CPU-emulated ones skip it by default).
    tune::set_policy(tune::Policy::Tune);
    let client = attn::default_client();
    let mut args = std::borrow::Cow::Borrowed(args);
    if args.misses {
        let path = cache::misses_path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let named = missed_variants(&text);
        if named.is_empty() {
            println!("attn-tune: no recorded misses ({})", path.display());
            return Ok(());
        }
        if args.variants.is_empty() {
            let known: Vec<&str> = tune::registered().iter().map(|r| r.spec.name).collect();
            args.to_mut().variants = named
                .into_iter()
                .filter(|n| known.contains(&n.as_str()))
                .collect();
        }
    }
    let args = args.as_ref();
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
    let stored = if grid.fp8 { ", fp8" } else { "" };
    let decode_note = match (grid.decode.len(), grid.page_size) {
        (0, _) => "no decode".to_string(),
        (n, None) => format!("{n} decode shapes{stored}"),
        (n, Some(page)) => format!("{n} decode shapes (pages of {page}{stored})"),
    };
    let prefill_note = if grid.shapes.is_empty() {
        format!("N {:?} × B·H {:?}", grid.seqs, grid.batch_heads)
    } else {
        format!("{} prefill shapes", grid.shapes.len())
    };
    println!(
        "attn-tune: {} variants on {} · grid: {prefill_note}, {decode_note} · cache {}",
        chosen.len(),
        client.properties().identity.name,
        cache::path().display()
    );
    let mut points = 0;
    for r in &chosen {
        points += grid.points(&r.spec).map_or(0, |p| p.len());
        if !r.spec.mask.documents {
            points += grid.decode.len();
        }
    }
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
    let mut decodes: Vec<DecodeReport> = Vec::new();
    let mut failures = Vec::new();
    for r in &chosen {
        // A declaration in several element types registers one variant per type, all under its
        // name: the lines tell them apart by the type.
        let shared = chosen.iter().filter(|o| o.spec.name == r.spec.name).count() > 1;
        let label = if shared {
            format!("{}<{}>", r.spec.name, r.spec.dtype.name())
        } else {
            r.spec.name.to_string()
        };
        bar.set_message(label.clone());
        let mut on_point = |report: &KeyReport| {
            // `suspend` prints above a visible bar, and prints at all under a hidden one.
            bar.suspend(|| {
                println!("{}", line(report, &label));
                if let Some(b) = &report.backward {
                    println!("{}", backward_line(b));
                }
            });
            bar.inc(1);
        };
        let prefill = if grid.seqs.is_empty() && grid.shapes.is_empty() {
            Ok(Vec::new())
        } else {
            (r.tune)(&client, &grid, &mut on_point)
        };
        let mut on_decode = |report: &DecodeReport| {
            bar.suspend(|| println!("{}", decode_line(report, &label)));
            bar.inc(1);
        };
        let decode = prefill.and_then(|mut done| {
            reports.append(&mut done);
            (r.tune_decode)(&client, &grid, &mut on_decode)
        });
        match decode {
            Ok(mut done) => decodes.append(&mut done),
            Err(e) => {
                bar.suspend(|| println!("{label:<20} failed: {e}"));
                failures.push(format!("{label}: {e}"));
            }
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.report {
        write_report(path, &reports, &decodes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let total = started.elapsed().as_secs_f64();
    let settle: f64 = reports.iter().map(|r| r.settle_s).sum::<f64>()
        + decodes.iter().map(|r| r.settle_s).sum::<f64>();
    println!(
        "attn-tune: {} prefill and {} decode keys in {total:.1} s ({settle:.1} s settling keys); cache {}",
        reports.len(),
        decodes.len(),
        cache::path().display()
    );
    if failures.is_empty() {
        if args.misses {
            let path = cache::misses_path();
            std::fs::write(&path, "").map_err(|e| format!("{}: {e}", path.display()))?;
        }
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
fn line(r: &KeyReport, label: &str) -> String {
    format!(
        "{:<20} {:<22} {:<20} {:>9.3} ms {:>8.2} µs/key | fallback {:<20} {:>9.3} ms ×{:.2} | {} candidates, settled in {:.2} s",
        label,
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

/// The backward plan's line under its point's: chosen plan, its time, the default's.
fn backward_line(b: &BackwardReport) -> String {
    format!(
        "{:<20} {:<22} {} | {} plans, settled in {:.2} s",
        "",
        "  backward",
        against_default(
            &b.chosen.to_string(),
            b.chosen_ms,
            &b.fallback.to_string(),
            b.fallback_ms
        ),
        b.plans,
        b.settle_s
    )
}

/// A decode point's line: variant, shape, the plan that runs and its time, the heuristic's.
fn decode_line(r: &DecodeReport, label: &str) -> String {
    let tokens = if r.tokens > 1 {
        format!(", {} tokens", r.tokens)
    } else {
        String::new()
    };
    let shape = format!(
        "decode {}×{}/{}, {} keys{tokens}",
        r.point.batch, r.point.heads_q, r.point.heads_kv, r.point.seq
    );
    format!(
        "{label:<20} {shape:<22} {} | settled in {:.2} s",
        against_default(
            &r.chosen.name(),
            r.chosen_ms,
            &r.fallback.name(),
            r.fallback_ms
        ),
        r.settle_s
    )
}

/// `chosen  ms | default  ms ×speed-up`, the middle of the backward and decode lines.
fn against_default(chosen: &str, chosen_ms: f64, default: &str, default_ms: f64) -> String {
    format!(
        "{chosen:<20} {chosen_ms:>9.3} ms {:>12} | default  {default:<20} {default_ms:>9.3} ms ×{:.2}",
        "",
        default_ms / chosen_ms.max(1e-9)
    )
}

fn write_report(
    path: &PathBuf,
    reports: &[KeyReport],
    decodes: &[DecodeReport],
) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    writeln!(
        f,
        "variant\tdtype\tkind\tbatch\theads_q\theads_kv\tseq\ttokens\tchosen\tchosen_ms\tfallback\tfallback_ms\tcandidates\tsettle_s\tbackward_chosen\tbackward_chosen_ms\tbackward_fallback\tbackward_fallback_ms"
    )?;
    for r in reports {
        let backward = r.backward.as_ref().map_or_else(
            || "\t\t\t".to_string(),
            |b| {
                format!(
                    "{}\t{:.4}\t{}\t{:.4}",
                    b.chosen, b.chosen_ms, b.fallback, b.fallback_ms
                )
            },
        );
        writeln!(
            f,
            "{}\t{}\tprefill\t{}\t{}\t{}\t{}\t{}\t{}\t{:.4}\t{}\t{:.4}\t{}\t{:.3}\t{backward}",
            r.variant,
            r.dtype.name(),
            r.point.batch,
            r.point.heads_q,
            r.point.heads_kv,
            r.point.seq,
            r.point.seq,
            r.chosen,
            r.chosen_ms,
            r.fallback,
            r.fallback_ms,
            r.candidates,
            r.settle_s
        )?;
    }
    let choices = tune::plan_choices().len();
    for r in decodes {
        let kind = match r.page_size {
            Some(page) => format!("decode_paged{page}"),
            None => "decode".to_string(),
        } + if r.fp8 { "_fp8" } else { "" };
        writeln!(
            f,
            "{}\t{}\t{kind}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.4}\t{}\t{:.4}\t{choices}\t{:.3}\t\t\t\t",
            r.variant,
            r.dtype.name(),
            r.point.batch,
            r.point.heads_q,
            r.point.heads_kv,
            r.point.seq,
            r.tokens,
            r.chosen.name(),
            r.chosen_ms,
            r.fallback.name(),
            r.fallback_ms,
            r.settle_s
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shapes_file_reads_both_kinds_with_comments() {
        let (prefill, decode) = parse_shapes(
            "# model server\nprefill 2 32 4096\n\ndecode 64 32 8192 # steady\ndecode 8 32 1024 4\n",
        )
        .unwrap();
        assert_eq!(
            prefill,
            [Shape {
                batch: 2,
                heads_q: 32,
                seq: 4096
            }]
        );
        assert_eq!(decode.len(), 2);
        assert_eq!(
            (
                decode[0].sequences,
                decode[0].heads_q,
                decode[0].keys,
                decode[0].tokens
            ),
            (64, Some(32), 8192, 1)
        );
        assert_eq!(decode[1].tokens, 4);
    }

    #[test]
    fn a_program_carrying_the_tuner_passes_its_own_arguments() {
        // `myserver attn-tune tune --grid nope`: an error, returned as the exit code.
        let code = main_from(["attn-tune", "tune", "--grid", "nope"]);
        assert_eq!(code, ExitCode::FAILURE);
        // A mistake in the arguments is clap's usage error, not a panic.
        assert_eq!(
            main_from(["attn-tune", "--no-such-flag"]),
            ExitCode::from(2)
        );
    }

    #[test]
    fn a_bad_shapes_line_is_named() {
        for (text, expect) in [
            ("prefill 2 32\n", "line 1: expected `prefill B Hq N`"),
            (
                "\ndecode 1 32 0\n",
                "line 2: `0` is not a positive whole number",
            ),
            ("encode 1 2 3\n", "line 1: unknown kind `encode`"),
            ("# nothing\n", "no shapes"),
        ] {
            let err = parse_shapes(text).unwrap_err();
            assert!(err.starts_with(expect), "{text:?}: {err}");
        }
    }
}
