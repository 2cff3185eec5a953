//! `flywheel artifacts`: copy files to and from an artifact store
//! (`file://`, `s3://`) with the settings the worker uses (`AWS_*`).

use flywheel_modelhub::artifacts;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ArtifactsCommand {
    /// Download URL (an object, or every object below it) to PATH.
    Get {
        url: String,
        path: std::path::PathBuf,
    },
    /// Upload PATH (a file, or every file below a folder) to URL.
    Put {
        path: std::path::PathBuf,
        url: String,
    },
}

pub async fn run(command: ArtifactsCommand) -> anyhow::Result<()> {
    let (n, from, to) = match command {
        ArtifactsCommand::Get { url, path } => (
            artifacts::download(&url, &path).await?,
            url,
            path.display().to_string(),
        ),
        ArtifactsCommand::Put { path, url } => (
            artifacts::upload(&path, &url).await?,
            path.display().to_string(),
            url,
        ),
    };
    println!("copied {n} file(s) from {from} to {to}");
    Ok(())
}
