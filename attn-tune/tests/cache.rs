//! The tuning cache as processes see it: `attn-tune` run as a program against a private cache
//! folder on the default back end (lavapipe without a GPU), one small variant, the quick grid.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VARIANT: &str = "Mha64";

/// A fresh cache folder for one test.
fn cache_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("attn-tune-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn attn_tune(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attn-tune"));
    cmd.args(args)
        .env("ATTN_CACHE_DIR", dir)
        .env_remove("ATTN_CACHE_FILE")
        .env_remove("ATTN_TUNE")
        .env_remove("CUBECL_AUTOTUNE_CACHE");
    cmd
}

/// How long one `attn-tune` process may take; a run takes seconds to a minute.
const PROCESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs `attn-tune` to completion, `prepare` first. A process still running after
/// [`PROCESS_LIMIT`] is killed and run once more, `prepare` again (the first attempt may have
/// changed the folder): on the CPU Vulkan driver (lavapipe), with two cores shared, wgpu-core
/// 30.0.2's `Device::maintain` can panic on a race between its fence and its queue ("If the queue
/// is empty, the current submission index (0) should be at least the wait submission index (1)";
/// fixed upstream in gfx-rs/wgpu#9958, after the wgpu cubecl pins), on cubecl's polling thread,
/// and the process then waits forever. The second attempt must finish.
fn run_to_end(dir: &Path, args: &[&str], prepare: &dyn Fn()) -> Output {
    for attempt in 1..=2 {
        prepare();
        // Outside the cache folder, which some commands clear.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let logs = std::env::temp_dir().join(format!("attn-tune-run-{}-{n}", std::process::id()));
        let (stdout, stderr) = (logs.with_extension("out"), logs.with_extension("err"));
        let mut child = attn_tune(dir, args)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("attn-tune runs");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > PROCESS_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let (out, err) = (
            std::fs::read(&stdout).unwrap(),
            std::fs::read(&stderr).unwrap(),
        );
        let _ = (std::fs::remove_file(&stdout), std::fs::remove_file(&stderr));
        match status {
            Some(status) => {
                return Output {
                    status,
                    stdout: out,
                    stderr: err,
                }
            }
            None => eprintln!(
                "attn-tune {args:?} still running after {PROCESS_LIMIT:?} (attempt {attempt}); killed\nstderr:\n{}",
                String::from_utf8_lossy(&err)
            ),
        }
    }
    panic!("attn-tune {args:?} did not finish twice in a row");
}

fn run(dir: &Path, args: &[&str]) -> Output {
    run_prepared(dir, args, &|| {})
}

/// [`run`], with `prepare` before each attempt.
fn run_prepared(dir: &Path, args: &[&str], prepare: &dyn Fn()) -> Output {
    let out = run_to_end(dir, args, prepare);
    assert!(
        out.status.success(),
        "attn-tune {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `attn-tune tune`'s arguments for the test variant's quick grid.
const TUNE: [&str; 6] = ["tune", "--variant", VARIANT, "--grid", "quick", "--quiet"];

fn tune(dir: &Path) -> Output {
    run(dir, &TUNE)
}

/// `status`'s counts: (tuned for this device, for others, tuning records).
fn status(dir: &Path) -> (u64, u64, u64) {
    let out = run(dir, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let count = |label: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` in status:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    (
        count("tuned for this device:"),
        count("tuned for other devices or cubecl versions:"),
        count("tuning records:"),
    )
}

/// The `variant … chosen` part of each report line.
fn choices(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(VARIANT))
        .map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" "))
        .collect()
}

/// The rows of a `--report` file, each by column name.
fn report_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let tsv = std::fs::read_to_string(path).unwrap();
    let mut lines = tsv.lines();
    let header: Vec<&str> = lines.next().expect("a header").split('\t').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split('\t'))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn is_database(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"SQLite format 3\0"))
}

#[test]
fn a_missing_cache_is_created_and_a_later_process_reuses_it() {
    let dir = cache_dir("reuse");
    let first = tune(&dir);
    assert!(
        is_database(&dir.join("default.db")),
        "the cache is a database"
    );
    let (ours, foreign, records) = status(&dir);
    assert!(ours >= 1, "the tuned key is stored");
    assert_eq!(foreign, 0);
    assert!(records >= 1, "the tuning round left its record");
    let second = tune(&dir);
    assert_eq!(choices(&first), choices(&second), "the same winner");
    assert!(!choices(&first).is_empty());
    let (ours2, _, records2) = status(&dir);
    assert_eq!(
        (ours2, records2),
        (ours, records),
        "a cached key is not tuned again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_cache_is_moved_aside_with_a_warning_and_rebuilt() {
    let dir = cache_dir("corrupt");
    let db = dir.join("default.db");
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // Each attempt starts from the corrupt file alone.
    let corrupt = || {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&db, &garbage).unwrap();
    };
    let out = run_prepared(&dir, &TUNE, &corrupt);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("was not a readable database"),
        "warned:\n{stderr}"
    );
    assert!(is_database(&db), "a new database took its place");
    let moved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "the bad file is kept aside for inspection");
    assert_eq!(std::fs::read(moved[0].path()).unwrap(), garbage);
    let (ours, _, records) = status(&dir);
    assert!(ours >= 1);
    tune(&dir);
    assert_eq!(
        status(&dir).2,
        records,
        "the rebuilt cache serves the next process"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_processes_tuning_at_once_leave_a_sound_cache() {
    let dir = cache_dir("concurrent");
    let args = ["tune", "--variant", VARIANT, "--grid", "quick", "--quiet"];
    let a = attn_tune(&dir, &args).spawn().unwrap();
    let b = attn_tune(&dir, &args).spawn().unwrap();
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
    }
    assert!(is_database(&dir.join("default.db")));
    let (ours, _, records) = status(&dir);
    assert!(ours >= 1);
    tune(&dir);
    assert_eq!(status(&dir).2, records, "after both, the key is cached");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_exported_bundle_pretunes_another_machine() {
    let (a, b) = (cache_dir("export-a"), cache_dir("export-b"));
    tune(&a);
    let bundle = a.join("fleet.db");
    run(&a, &["export", bundle.to_str().unwrap()]);
    run(&b, &["import", bundle.to_str().unwrap()]);
    let (ours, _, records) = status(&b);
    assert!(ours >= 1, "the imported key is there");
    assert_eq!(records, 0, "records stay home");
    tune(&b);
    assert_eq!(status(&b).2, 0, "nothing was tuned on the importing side");
    run(&b, &["clear"]);
    assert!(!b.join("default.db").exists());
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn an_unknown_variant_is_an_error_that_names_the_known_ones() {
    let dir = cache_dir("unknown");
    let out = attn_tune(&dir, &["tune", "--variant", "Nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no variant `Nope`") && stderr.contains(VARIANT),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn backward_plans_are_tuned_and_reported_when_asked() {
    let dir = cache_dir("backward");
    let report = dir.join("report.tsv");
    let report_arg = report.to_string_lossy().to_string();
    let out = run(
        &dir,
        &[
            "tune",
            "--variant",
            VARIANT,
            "--grid",
            "quick",
            "--quiet",
            "--backward",
            "--report",
            &report_arg,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("backward")),
        "a backward line under the point:\n{stdout}"
    );
    let rows = report_rows(&report);
    assert!(!rows.is_empty());
    for row in &rows {
        let (chosen, fallback) = (&row["backward_chosen"], &row["backward_fallback"]);
        for plan in [chosen, fallback] {
            assert!(
                plan.contains("_r") && plan.contains("_s"),
                "a plan name: {plan:?}"
            );
        }
        let ms: f64 = row["backward_chosen_ms"].parse().unwrap();
        assert!(ms > 0.0, "timed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_deployments_shapes_file_tunes_its_prefill_and_decode_shapes() {
    let dir = cache_dir("shapes");
    let shapes = dir.join("shapes.txt");
    std::fs::write(
        &shapes,
        "# the shapes this server sees\nprefill 1 4 160   # a prompt\ndecode 3 4 300\n",
    )
    .unwrap();
    let report = dir.join("report.tsv");
    let (shapes_arg, report_arg) = (
        shapes.to_string_lossy().to_string(),
        report.to_string_lossy().to_string(),
    );
    let out = run(
        &dir,
        &[
            "tune",
            "--variant",
            VARIANT,
            "--quiet",
            "--samples",
            "2",
            "--shapes",
            &shapes_arg,
            "--report",
            &report_arg,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 prefill and 1 decode keys"),
        "one key of each kind:\n{stdout}"
    );
    let rows = report_rows(&report);
    let row = |kind: &str| {
        rows.iter()
            .find(|r| r["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind} row in {rows:?}"))
    };
    let prefill = row("prefill");
    assert_eq!(
        [&prefill["batch"], &prefill["heads_q"], &prefill["seq"]],
        ["1", "4", "160"]
    );
    let decode = row("decode");
    assert_eq!(
        [
            &decode["batch"],
            &decode["heads_q"],
            &decode["seq"],
            &decode["tokens"]
        ],
        ["3", "4", "300", "1"]
    );
    for plan in [&decode["chosen"], &decode["fallback"]] {
        assert!(
            plan.starts_with('r') && plan.contains("_u") && plan.contains("_s"),
            "a decode plan name: {plan:?}"
        );
    }
    let ms: f64 = decode["chosen_ms"].parse().unwrap();
    assert!(ms > 0.0, "timed");

    // The same decode shape against a paged fp8 cache: a key of its own, tuned and reported.
    std::fs::write(&shapes, "decode 3 4 300\n").unwrap();
    let out = run(
        &dir,
        &[
            "tune",
            "--variant",
            VARIANT,
            "--quiet",
            "--samples",
            "2",
            "--shapes",
            &shapes_arg,
            "--page-size",
            "16",
            "--fp8",
            "--report",
            &report_arg,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("pages of 16, fp8"),
        "the run names the cache it tunes:\n{stdout}"
    );
    let rows = report_rows(&report);
    let fp8 = rows
        .iter()
        .find(|r| r["kind"] == "decode_paged16_fp8")
        .unwrap_or_else(|| panic!("an fp8 decode row in {rows:?}"));
    assert_eq!([&fp8["batch"], &fp8["seq"]], ["3", "300"]);
    let ms: f64 = fp8["chosen_ms"].parse().unwrap();
    assert!(ms > 0.0, "timed");

    // A line the file cannot mean is refused before anything runs, naming the line.
    std::fs::write(&shapes, "prefill 1 4 160\ndecode 3 four 300\n").unwrap();
    let out = attn_tune(
        &dir,
        &["tune", "--variant", VARIANT, "--shapes", &shapes_arg],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 2") && stderr.contains("`four`"),
        "the error names the line and the word:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shapes calls under `ATTN_TUNE=deferred` recorded (`misses.txt` beside the database) are
/// tuned by `attn-tune tune --misses`, for the variant they name, and the file is emptied; with
/// nothing recorded there is nothing to do.
#[test]
fn recorded_misses_are_tuned_and_cleared() {
    let dir = cache_dir("misses");
    let misses = dir.join("misses.txt");
    std::fs::write(
        &misses,
        format!("prefill 1 4 160   # {VARIANT}\ndecode 3 4 300 1   # {VARIANT}\n"),
    )
    .unwrap();
    let out = run(&dir, &["tune", "--misses", "--quiet", "--samples", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("attn-tune: 1 variants") && stdout.contains("1 prefill and 1 decode keys"),
        "the recorded variant's two shapes:\n{stdout}"
    );
    assert_eq!(std::fs::read_to_string(&misses).unwrap(), "", "emptied");
    let out = run(&dir, &["tune", "--misses", "--quiet"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no recorded misses"), "{stdout}");
}
