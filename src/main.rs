use std::ffi::OsString;
use std::process::ExitCode;

use keyspaces_proxy::config::{Cli, Command};
use keyspaces_proxy::{app, check};

/// The command line with the config file's entries merged in (flag > env > file > default).
fn parse_cli(argv: Vec<OsString>) -> Result<Cli, Box<dyn std::error::Error>> {
    Cli::parse_with_config(argv)
}

fn main() -> ExitCode {
    let cli = match parse_cli(std::env::args_os().collect()) {
        Ok(c) => c,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_err) => clap_err.exit(),
            Err(e) => {
                eprintln!("keyspaces-proxy: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if cli.print_config {
        print!("{}", cli.effective_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Probe {
        path,
        metrics_listen,
    }) = &cli.command
    {
        return keyspaces_proxy::probe::run(metrics_listen.unwrap_or(cli.metrics_listen), path);
    }
    if cli.command == Some(Command::HashPassword) {
        return hash_password();
    }
    let checking = cli.command == Some(Command::Check);
    if !checking {
        app::init_logging(cli.log_format);
    }
    let runtime = match keyspaces_proxy::runtime::build(cli.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyspaces-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if checking {
        return runtime.block_on(check::run(&cli));
    }
    // Logging is up by now: the error is said once, in the log.
    match runtime.block_on(app::run(cli, std::env::args_os().collect(), |_| {})) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_status())
        }
    }
}

/// `keyspaces-proxy hash-password`: one line of standard input in, its argon2id hash out.
fn hash_password() -> ExitCode {
    let mut line = zeroize::Zeroizing::new(String::new());
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("keyspaces-proxy: cannot read the password from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("keyspaces-proxy: no password on standard input (one line, e.g. `echo -n … |`)");
        return ExitCode::from(2);
    }
    println!(
        "{}",
        keyspaces_proxy::auth::passwords::hash_password(password.as_bytes())
    );
    ExitCode::SUCCESS
}
