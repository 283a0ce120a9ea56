//! flotilla-server: one process with embedded defaults — HTTP API, HTTPS device listener,
//! MQTT broker with mutual TLS, PKI, ingest, commands and audit.

mod app;
mod auth;
mod broker;
mod broker_sync;
mod command_waits;
mod commands;
mod config;
mod conn_limits;
mod demo;
mod device_config;
mod device_listener;
mod downlink;
mod error;
mod ingest;
mod leader;
mod listener;
mod login_limits;
mod metrics;
mod openapi;
mod ota;
mod passwords;
mod proxy_protocol;
mod renewal;
mod replica_id;
mod retention;
mod rollouts;
mod rotation;
mod routes;
mod server;
mod service_link;
mod shared_limits;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flotilla-server", version, about = "Flotilla fleet server")]
struct Cli {
    #[command(flatten)]
    config: config::ServerConfig,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Offline administration of the data dir.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Keep an external Mosquitto's CRL and ACL in step with revoked and blocked devices
    /// (runs beside the broker; see docs/operations.md).
    BrokerSync(broker_sync::BrokerSyncArgs),
}

#[derive(Subcommand)]
enum AdminAction {
    /// Create an admin account.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "admin")]
        username: String,
    },
    /// Issue a TLS server certificate for an external broker from the data dir's CA:
    /// `broker.pem` and `broker.key` (0600) in `--out-dir`.
    BrokerCert {
        /// A DNS name or IP address devices and replicas reach the broker by; repeat for more.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long)]
        out_dir: std::path::PathBuf,
        /// Make the CA in the data dir if there is none (a first installation); without it a
        /// data dir without a CA is an error, not a new CA nobody trusts.
        #[arg(long)]
        create_ca: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_config {
        let mut shown = serde_json::to_value(&cli.config).unwrap_or_default();
        if let Some(settings) = shown.as_object_mut() {
            settings.insert("mode".into(), cli.config.mode());
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,rmqtt=warn,rumqttc=warn,sqlx::postgres::notice=warn".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => server::run(cli.config).await,
            Some(Command::Admin {
                action:
                    AdminAction::Create {
                        email,
                        password,
                        username,
                    },
            }) => {
                let id = server::create_admin(
                    &cli.config.data_dir,
                    &cli.config.database()?,
                    &email,
                    &password,
                    &username,
                )
                .await?;
                println!("created admin {email} (id {id})");
                Ok(())
            }
            Some(Command::Admin {
                action:
                    AdminAction::BrokerCert {
                        hosts,
                        out_dir,
                        create_ca,
                    },
            }) => {
                let ca = if create_ca {
                    flotilla_pki::CertificateAuthority::load_or_create(&cli.config.data_dir)?
                } else {
                    flotilla_pki::CertificateAuthority::load(&cli.config.data_dir)?
                };
                let issued = ca.issue_server_certificate(&hosts)?;
                std::fs::create_dir_all(&out_dir)?;
                std::fs::write(out_dir.join("broker.pem"), &issued.certificate_pem)?;
                flotilla_pki::write_secret_file(
                    &out_dir.join("broker.key"),
                    issued.private_key_pem.as_bytes(),
                )?;
                println!(
                    "wrote {} (valid 365 days) and broker.key",
                    out_dir.join("broker.pem").display()
                );
                Ok(())
            }
            Some(Command::BrokerSync(args)) => {
                let store = flotilla_store::Store::open(&cli.config.database()?).await?;
                let ca = flotilla_pki::CertificateAuthority::load(&cli.config.data_dir)?;
                let broker_ca_pem = match &cli.config.broker_ca {
                    Some(path) => std::fs::read_to_string(path)?,
                    None => ca.certificate_pem().to_string(),
                };
                broker_sync::run(store, ca, broker_ca_pem, args).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
