//! The `millet` binary: parse configuration, start the listeners, drain on
//! SIGINT / SIGTERM. `millet passwd FILE USER` edits an argon2id password file,
//! `millet scram FILE USER` a SCRAM-SHA-256 credentials file, `millet ctl
//! key add NAME --file FILE` creates an admin API key, and `millet ctl
//! COMMAND` administers a running broker through its admin API.

use clap::Parser;
use millet::config::{Cli, Config};
use millet::server::Server;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // `millet ctl key add NAME --file FILE`: admin API keys (offline);
    // `millet ctl COMMAND`: the admin API from the command line.
    if args.get(1).map(String::as_str) == Some("ctl") {
        let rest = args.get(2..).unwrap_or_default();
        let (out, code) = if rest.first().map(String::as_str) == Some("key") {
            millet::admin::keys::ctl(rest)
        } else {
            match millet::admin::ctl::run(rest) {
                Ok(out) => (out, 0),
                Err(e) => (e.message, e.code),
            }
        };
        if code == 0 {
            if !out.is_empty() {
                println!("{out}");
            }
        } else {
            eprintln!("millet ctl: {}", out.trim_end());
        }
        return std::process::ExitCode::from(code);
    }
    // `millet passwd ...` / `millet scram ...`
    if let Some(code) = millet::tools::dispatch(&args) {
        return code;
    }
    let cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log) {
        // rustls warns once per handshake about a client that sends an IP
        // address as SNI (mosquitto_pub -h 127.0.0.1 does): not news.
        Ok(f) => match "rustls::msgs::handshake=error".parse() {
            Ok(d) => f.add_directive(d),
            Err(_) => f,
        },
        Err(e) => {
            eprintln!(
                "millet: invalid --log / MILLET_LOG filter {:?}: {e}",
                cli.log
            );
            return std::process::ExitCode::from(2);
        }
    };
    // Colour only for a person at a terminal: log files and journald get
    // plain text.
    match cli.log_format {
        millet::config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        millet::config::LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "millet: invalid configuration: {}",
                millet::config::describe_error(&e)
            );
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("millet: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("millet: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause only when the text so far does not
/// already say it (our errors often embed their source's message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let t = cause.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
    }
    s
}

async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %config.data_dir.display(), "starting millet");
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let server = Server::start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: draining connections");
    server.shutdown(std::time::Duration::from_secs(5)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
