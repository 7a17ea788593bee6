//! Where tuned shapes persist, and keeping that store healthy.
//!
//! The store is cubecl's environment database (`<root>/default.db`, SQLite format, shared by
//! every device, each under its own namespace with the hardware identity and cubecl's version).
//! The root is `ATTN_CACHE_DIR` when set, else cubecl's default (`target/environment` of the
//! enclosing Cargo project, else the user cache folder, `~/.cache/cubecl` on Linux).
//! `ATTN_CACHE_FILE` mounts one database file instead (a shipped bundle, used in place).
//!
//! The same database keeps compiled kernels ([`configure`]): on CUDA the PTX and the machine
//! code the driver assembled, keyed by kernel and by the binary's build id, so a new process of
//! the same program loads its kernels instead of compiling them again.

use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

use cubecl::bundle::{BundleFormat, BundleManifest, ExportOptions, ImportReport};
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use cubecl::environment;

use crate::tensor::ComputeClient;
use crate::AttnError;

/// The name of the tuner's table, the last segment of its namespaces.
pub const TUNER_NAME: &str = "attn-prefill";
/// The cache namespace of the decode plans' tuner.
pub const DECODE_TUNER_NAME: &str = "attn-decode-2";
/// The cache namespace of the backward plans' tuner (`-2`: the candidates' order changed and
/// the split plans joined them).
pub const BACKWARD_TUNER_NAME: &str = "attn-backward-2";
/// The cache namespace of the backward plans' tuner in deterministic mode
/// ([`crate::set_deterministic`]): the plans that add a gradient up with atomics left out.
pub const DETERMINISTIC_BACKWARD_TUNER_NAME: &str = "attn-backward-deterministic-2";
/// The cubecl version the namespaces of this build carry.
pub const CUBECL_VERSION: &str = "0.12.0-pre.1";
/// What every SQLite database file starts with.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// A cache folder set by [`use_dir`], over `ATTN_CACHE_DIR`.
static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Keeps the cache in `dir` for this process, as `ATTN_CACHE_DIR` would; must come before the
/// first tuned call (returns false, changing nothing, when the cache is already in use).
pub fn use_dir(dir: impl Into<PathBuf>) -> bool {
    !INIT.is_completed() && DIR.set(dir.into()).is_ok()
}

static INIT: Once = Once::new();

/// Turns on cubecl's store of compiled kernels for this process, unless `ATTN_KERNEL_CACHE` is
/// `off` (or `0`) or cubecl's configuration was already loaded (a client made before this call,
/// or an application that set its own); returns whether the store is on.
///
/// cubecl reads its configuration once, when the first client is made: [`default_client`](crate::default_client)
/// (crate::default_client) calls this first; an application making its own client (burn,
/// candle, a cubecl device) calls it before that, or sets `[compilation] cache = true` in its
/// `cubecl.toml`. What the store keeps is keyed by the binary's build id, the device's
/// architecture and the PTX version: a rebuilt program compiles again, and a driver that
/// refuses stored machine code gets the stored PTX instead.
pub fn configure() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let wanted = !matches!(
            std::env::var("ATTN_KERNEL_CACHE").as_deref(),
            Ok("off" | "0")
        );
        if wanted {
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            config.compilation.cache = true;
            if CubeClRuntimeConfig::try_set(config) {
                tracing::debug!("attn: compiled kernels kept in the cache database");
            }
        }
        // cubecl applies its configuration's root when it first loads it: load it before ours.
        let on = CubeClRuntimeConfig::get().compilation.cache;
        if let Some(dir) = DIR.get() {
            environment::set_root(dir.clone());
        } else if let Some(file) = std::env::var_os("ATTN_CACHE_FILE") {
            environment::load(PathBuf::from(file));
        } else if let Some(dir) = std::env::var_os("ATTN_CACHE_DIR") {
            environment::set_root(PathBuf::from(dir));
        }
        on
    })
}

/// Points cubecl at the cache and repairs it, once per process (every tuned call does this first).
pub fn init() {
    INIT.call_once(|| {
        configure();
        // A folder given after the configuration was applied.
        if let Some(dir) = DIR.get() {
            environment::set_root(dir.clone());
        }
        if let Some(moved) = repair(&environment::path()) {
            tracing::warn!(
                cache = %environment::path().display(),
                moved_to = %moved.display(),
                "attn: the tuning cache was not a readable database; moved it aside and starting a new one"
            );
        }
    });
}

/// The database file tuned shapes are kept in.
pub fn path() -> PathBuf {
    init();
    environment::path()
}

/// The file where [`super::Policy::Deferred`] records the shapes it found no tuned pick for,
/// beside the database: one line per shape in the grammar of `attn-tune tune --shapes`
/// (`prefill B Hq N` or `decode B Hq N tokens`), the variant in a comment. `attn-tune tune
/// --misses` tunes them and empties the file.
pub fn misses_path() -> PathBuf {
    path().with_file_name("misses.txt")
}

/// Appends `line` to [`misses_path`] unless the file has it already (read once per process).
pub(crate) fn record_miss(line: String) {
    use std::io::Write;
    static SEEN: std::sync::Mutex<Option<Vec<String>>> = std::sync::Mutex::new(None);
    let file = misses_path();
    {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        let seen = seen.get_or_insert_with(|| {
            std::fs::read_to_string(&file)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        });
        if seen.contains(&line) {
            return;
        }
        seen.push(line.clone());
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| writeln!(f, "{line}"));
    match written {
        Ok(()) => {
            tracing::info!(shape = %line, file = %file.display(), "attn: no tuned pick for this shape: the fallback runs, the shape is recorded for attn-tune")
        }
        Err(e) => {
            tracing::warn!(shape = %line, file = %file.display(), error = %e, "attn: no tuned pick for this shape, and it could not be recorded")
        }
    }
}

/// Moves a database that cannot be one (wrong header, or a write-ahead log with a wrong header)
/// aside, with its side files, so cubecl starts a new one; returns where it went. cubecl itself
/// would fall back to memory on every run while the bad file stays. An empty or missing file is
/// left alone (cubecl initialises it).
pub fn repair(db: &Path) -> Option<PathBuf> {
    let head = read_head(db, 16);
    let wal = side(db, "-wal");
    let wal_head = read_head(&wal, 4);
    let bad_db = head
        .as_ref()
        .is_some_and(|h| !h.is_empty() && h[..] != SQLITE_MAGIC[..]);
    let bad_wal = wal_head.as_ref().is_some_and(|h| {
        !h.is_empty() && !matches!(h[..], [0x37, 0x7f, 0x06, 0x82] | [0x37, 0x7f, 0x06, 0x83])
    });
    if !bad_db && !bad_wal {
        return None;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let moved = side(db, &format!(".corrupt-{stamp}"));
    if std::fs::rename(db, &moved).is_err() {
        let _ = std::fs::remove_file(db);
    }
    for suffix in ["-wal", "-tshm", "-shm"] {
        let _ = std::fs::rename(side(db, suffix), side(&moved, suffix));
    }
    Some(moved)
}

fn read_head(path: &Path, n: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut head = Vec::with_capacity(n);
    file.take(n as u64).read_to_end(&mut head).ok()?;
    Some(head)
}

fn side(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Deletes the cache (the database and its side files). The next tuned call starts a new one.
pub fn clear() -> Result<(), AttnError> {
    let db = path();
    for file in [
        db.clone(),
        side(&db, "-wal"),
        side(&db, "-tshm"),
        side(&db, "-shm"),
    ] {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AttnError::Cache(format!(
                    "cannot remove {}: {e}",
                    file.display()
                )))
            }
        }
    }
    Ok(())
}

/// Tuned entries in the cache: for this device and cubecl version, and for others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries this device can use.
    pub ours: u64,
    /// Entries of other devices or other cubecl versions (kept, never used here).
    pub foreign: u64,
    /// Accounts of tuning rounds cubecl keeps (one per round that ran, under `records`).
    pub records: u64,
    /// Entries of other cubecl namespaces (whatever else its back ends persist).
    pub other: u64,
}

/// Counts the cache's entries for `client`'s device.
pub fn summary(client: &ComputeClient) -> Summary {
    init();
    let hardware = client.hardware_identity().to_string();
    let rows: Vec<(String, u64)> = environment::namespaces()
        .into_iter()
        .map(|n| (n.namespace, n.entries))
        .collect();
    classify(&rows, CUBECL_VERSION, &hardware)
}

/// Splits namespaces (with their entry counts) into this build's tuner for `hardware`, the same
/// tuner for other devices or versions, and the rest.
pub fn classify(rows: &[(String, u64)], version: &str, hardware: &str) -> Summary {
    let simple = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    };
    let (version, hardware) = (simple(version), simple(hardware));
    let mut summary = Summary::default();
    for (namespace, entries) in rows {
        let segments: Vec<String> = namespace.split('/').map(simple).collect();
        let tuner = segments.first().is_some_and(|s| s == "autotune")
            && segments.last().is_some_and(|s| {
                [
                    TUNER_NAME,
                    DECODE_TUNER_NAME,
                    BACKWARD_TUNER_NAME,
                    DETERMINISTIC_BACKWARD_TUNER_NAME,
                ]
                .contains(&s.as_str())
            });
        if segments.first().is_some_and(|s| s == "records") {
            summary.records += entries;
        } else if !tuner {
            summary.other += entries;
        } else if segments.contains(&version) && segments.contains(&hardware) {
            summary.ours += entries;
        } else {
            summary.foreign += entries;
        }
    }
    summary
}

/// Warns when the cache holds tuned shapes for other devices or cubecl versions and none for this
/// one: a cache copied from another machine or left by an upgrade, ignored here.
pub fn warn_if_foreign(client: &ComputeClient) -> Summary {
    let s = summary(client);
    if s.ours == 0 && s.foreign > 0 {
        tracing::warn!(
            cache = %path().display(),
            foreign = s.foreign,
            device = %client.properties().identity.name,
            cubecl = CUBECL_VERSION,
            "attn: the tuning cache holds tuned shapes for other devices or cubecl versions only; they are ignored and this device is tuned anew"
        );
    }
    s
}

/// Writes the cache (tuned shapes and whatever else cubecl keeps there, not the tuning records)
/// into a bundle file (SQLite format) that identical machines import or mount (`ATTN_CACHE_FILE`).
pub fn export(out: &Path) -> Result<BundleManifest, AttnError> {
    let db = path();
    let options = ExportOptions {
        name: "attn".to_string(),
        excluded_namespaces: vec!["records".to_string()],
        format: BundleFormat::Sqlite,
        ..Default::default()
    };
    cubecl::bundle::export(&[&db], out, &options)
        .map_err(|e| AttnError::Cache(format!("cannot export to {}: {e}", out.display())))
}

/// Copies a bundle's entries into the cache (entries already there are kept).
pub fn import(bundle: &Path) -> Result<ImportReport, AttnError> {
    init();
    let opened = cubecl::bundle::open(bundle)
        .map_err(|e| AttnError::Cache(format!("cannot open {}: {e}", bundle.display())))?;
    Ok(cubecl::bundle::import(opened.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_split_by_device_and_version() {
        let rows = vec![
            (
                "autotune/0.12.0-pre.1/layout-v1/wgpu_x_llvmpipe_par0/attn-prefill".to_string(),
                3,
            ),
            (
                "autotune/0.11.3/layout-v1/wgpu_x_llvmpipe_par0/attn-prefill".to_string(),
                5,
            ),
            (
                "autotune/0.12.0-pre.1/layout-v1/cuda_ptx-sm90_NVIDIA-H200_par132/attn-prefill"
                    .to_string(),
                7,
            ),
            (
                "autotune/0.12.0-pre.1/layout-v1/wgpu_x_llvmpipe_par0/matmul".to_string(),
                11,
            ),
            ("wgpu/kernels".to_string(), 13),
            ("records/v1/autotune/attn-prefill".to_string(), 17),
        ];
        let s = classify(&rows, "0.12.0-pre.1", "wgpu_x_llvmpipe_par0");
        assert_eq!(
            s,
            Summary {
                ours: 3,
                foreign: 12,
                records: 17,
                other: 24
            }
        );
    }

    /// The namespaces carry cubecl's version; a bump of the pin must bump the constant.
    #[test]
    fn the_version_constant_follows_the_pinned_cubecl() {
        let manifest = include_str!("../../../Cargo.toml");
        assert!(
            manifest.contains(&format!("cubecl = {{ version = \"={CUBECL_VERSION}\"")),
            "Cargo.toml pins another cubecl than CUBECL_VERSION ({CUBECL_VERSION})"
        );
    }

    #[test]
    fn repair_moves_garbage_and_keeps_databases() {
        let dir = std::env::temp_dir().join(format!("attn-repair-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("default.db");
        std::fs::write(&db, b"definitely not a database, just bytes").unwrap();
        let moved = repair(&db).expect("garbage is moved aside");
        assert!(!db.exists() && moved.exists());
        let mut good = SQLITE_MAGIC.to_vec();
        good.extend_from_slice(&[0; 100]);
        std::fs::write(&db, &good).unwrap();
        assert_eq!(repair(&db), None);
        std::fs::write(side(&db, "-wal"), b"garbage wal").unwrap();
        assert!(repair(&db).is_some(), "a bad write-ahead log is moved too");
        assert!(!db.exists() && !side(&db, "-wal").exists());
        std::fs::write(&db, b"").unwrap();
        assert_eq!(repair(&db), None, "an empty file is cubecl's to initialise");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
