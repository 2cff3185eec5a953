//! A private PostgreSQL cluster for `flywheel up` when no `DATABASE_URL` is
//! given: initialised in a data folder from the machine's PostgreSQL server
//! binaries (installed with apt when missing) and started on its own port.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub struct LocalPostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Postgres refuses to run as root; when we are root it runs as `postgres`.
    run_as: Option<&'static str>,
}

impl LocalPostgres {
    /// Finds (or installs) the server binaries for a cluster in `data`.
    pub fn new(data: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = match find_bin_dir() {
            Some(b) => b,
            None => {
                // One install at a time in this process: two clusters set up
                // at once would both run apt-get, and the second fail on its
                // lock (seen in a clean Debian 12 chroot).
                let _one = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
                match find_bin_dir() {
                    Some(b) => b,
                    None => {
                        install()?;
                        find_bin_dir()
                            .context("PostgreSQL was installed but initdb is not found")?
                    }
                }
            }
        };
        let run_as = is_root().then_some("postgres");
        let data = match run_as {
            Some(user) => reachable_by(user, data)?,
            None => data.to_path_buf(),
        };
        Ok(Self {
            bin,
            data,
            port,
            run_as,
        })
    }

    /// The cluster's data folder (its `postmaster.pid` among the rest).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Initialises the cluster if needed and starts it if it is not running.
    pub fn start(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data)?;
        if let Some(user) = self.run_as {
            run(Command::new("chown").args(["-R", user]).arg(&self.data))?;
        }
        if !self.data.join("PG_VERSION").exists() {
            eprintln!(
                "initialising a PostgreSQL cluster in {}",
                self.data.display()
            );
            run(self
                .cmd("initdb")
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
                .arg(&self.data))?;
        }
        if self
            .cmd("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.data)
            .output()?
            .status
            .success()
        {
            return Ok(());
        }
        eprintln!("starting PostgreSQL on 127.0.0.1:{}", self.port);
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.data.display()
        );
        run(self
            .cmd("pg_ctl")
            .args(["start", "-w", "-t", "60", "-o", &opts, "-l"])
            .arg(self.data.join("postgres.log"))
            .arg("-D")
            .arg(&self.data))
    }

    pub fn stop(&self) -> anyhow::Result<()> {
        run(self
            .cmd("pg_ctl")
            .args(["stop", "-m", "fast", "-D"])
            .arg(&self.data))
    }

    fn cmd(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }
}

/// `data` if `user` can reach its parent folder; otherwise a folder of its
/// own under /var/lib (root's home is closed to other users).
fn reachable_by(user: &str, data: &Path) -> anyhow::Result<PathBuf> {
    let parent = data.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)?;
    let ok = Command::new("runuser")
        .args(["-u", user, "--", "test", "-x"])
        .arg(parent)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(data.to_path_buf());
    }
    let tag: String = data
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let alt = PathBuf::from("/var/lib/flywheel-postgres").join(tag.trim_matches('_'));
    eprintln!(
        "{} is not reachable by the {user} user; keeping the database in {}",
        data.display(),
        alt.display()
    );
    Ok(alt)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`, or the
/// directory `pg_config --bindir` names.
fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn install() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "PostgreSQL server binaries are not installed; install them (Debian: `sudo apt-get install postgresql`) or set DATABASE_URL"
        );
    }
    eprintln!("installing PostgreSQL with apt-get (no DATABASE_URL and no server binaries found)");
    run(Command::new("apt-get").arg("update"))?;
    // Another process's apt-get is waited for, not failed on.
    run(Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
        .args(["--no-install-recommends", "postgresql"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
