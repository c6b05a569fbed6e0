use clap::Parser;
use shoal::cli::{Cli, Command};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,hickory_server=warn,hickory_net=warn")
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log that cannot be written (a full disk under the log file)
        // must not take the agent down: tracing-subscriber reports its own
        // write errors with eprintln!, which panics when stderr fails too.
        .log_internal_errors(false)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => {
            init_logging();
            // Everything the agent and its supervisors create (state, logs,
            // instance records) is private to its user; tasks get the usual
            // 022 back (see `supervise`).
            unsafe { libc::umask(0o077) };
            match args.into_config() {
                Ok(config) => tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
                    .block_on(shoal::agent::run(config, shutdown_signal())),
                Err(e) => Err(e),
            }
        }
        Command::Nodes(args) => shoal::commands::nodes(args),
        Command::Run(args) => shoal::commands::run(args),
        Command::Validate(args) => shoal::commands::validate(args),
        Command::Status(args) => shoal::commands::status(args),
        Command::Stop(args) => shoal::commands::stop(args),
        Command::Scale(args) => shoal::commands::scale(args),
        Command::Logs(args) => shoal::commands::logs(args),
        Command::Events(args) => shoal::commands::events(args),
        Command::Ui(args) => shoal::commands::ui(args),
        Command::Token(cmd) => shoal::commands::token(cmd),
        Command::Job(cmd) => shoal::commands::job(cmd),
        Command::Deployment(cmd) => shoal::commands::deployment(cmd),
        Command::Cron(cmd) => shoal::commands::cron(cmd),
        Command::Node(cmd) => shoal::commands::node(cmd),
        Command::Service(cmd) => shoal::commands::service(cmd),
        Command::Plan(args) => std::process::exit(shoal::commands::plan(args)),
        Command::Ca(cmd) => shoal::commands::ca(cmd),
        Command::Demo(args) => shoal::demo::run(args),
        Command::Supervise(args) => {
            let limits = args
                .cpu_millis
                .zip(args.memory_mib)
                .map(
                    |(cpu_millis, memory_mib)| shoal::driver::supervise::Limits {
                        cpu_millis,
                        memory_mib,
                    },
                );
            let code = shoal::driver::supervise::run(
                &args.dir,
                &args.command[0],
                &args.command[1..],
                limits,
                args.uid.zip(args.gid),
            );
            return match code {
                Ok(c) => std::process::ExitCode::from(c.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
