use clap::Parser;

fn main() {
    havip_user::init_logging();
    if let Err(e) = havip_user::cli::havip_main(havip_user::cli::HavipCli::parse()) {
        eprintln!("havip: {e:#}");
        std::process::exit(1);
    }
}
