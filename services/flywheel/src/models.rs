//! `flywheel models`: the model-version registry (pull, import, list,
//! promote, adapters trained elsewhere).

use crate::Config;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model and register it: the default SmolLM2-135M-Instruct, or
    /// a Hugging Face hub file `owner/repo/file.gguf[@revision]`.
    Pull {
        spec: Option<String>,
        /// Make it the champion.
        #[arg(long)]
        champion: bool,
    },
    /// Register a local GGUF file.
    Import {
        path: std::path::PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        champion: bool,
    },
    /// List model versions.
    List,
    /// Make a model version the champion.
    Promote { name: String },
    /// Register a PEFT LoRA adapter trained elsewhere: merged into its base
    /// (Q8_0 GGUF) as a new model version.
    ImportAdapter {
        /// Folder with adapter_config.json and adapter_model.safetensors,
        /// or its URL in an artifact store (file://, s3://).
        dir: String,
        /// The base model version (default: the champion).
        #[arg(long)]
        base: Option<String>,
        #[arg(long)]
        name: String,
    },
}

pub async fn run(
    cfg: &Config,
    pool: &flywheel_store::PgPool,
    command: ModelsCommand,
) -> anyhow::Result<()> {
    use flywheel_store::models;
    let (fetched, champion) = match command {
        ModelsCommand::Pull { spec, champion } => (
            crate::bootstrap::pull(cfg, spec.as_deref()).await?,
            champion,
        ),
        ModelsCommand::Import {
            path,
            name,
            champion,
        } => {
            let cache = flywheel_modelhub::ModelCache::new(&cfg.models.cache)?;
            (cache.import(&path, name.as_deref()).await?, champion)
        }
        ModelsCommand::List => {
            println!(
                "{:<36}  {:<32}  {:<10}  {:<8}  source",
                "id", "name", "sha256", "champion"
            );
            for v in models::list(pool).await? {
                println!(
                    "{:<36}  {:<32}  {:<10}  {:<8}  {}",
                    v.id,
                    v.name,
                    &v.sha256[..10.min(v.sha256.len())],
                    if v.is_champion { "yes" } else { "" },
                    v.source
                );
            }
            return Ok(());
        }
        ModelsCommand::ImportAdapter { dir, base, name } => {
            let v = crate::train::import_adapter(cfg, pool, &dir, base.as_deref(), &name).await?;
            println!("registered {} ({}) from the adapter in {dir}", v.name, v.id);
            return Ok(());
        }
        ModelsCommand::Promote { name } => {
            let v = models::set_champion(pool, &name).await?;
            println!("{} is now the champion", v.name);
            return Ok(());
        }
    };
    let v = crate::bootstrap::register(pool, &fetched).await?;
    println!("registered {} ({}) sha256 {}", v.name, v.id, v.sha256);
    if champion || models::champion(pool).await?.is_none() {
        models::set_champion(pool, &v.name).await?;
        println!("{} is now the champion", v.name);
    }
    Ok(())
}
