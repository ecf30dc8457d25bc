use clap::Parser;

fn main() {
    havip_user::init_logging();
    if let Err(e) = havip_user::cli::havipd_main(havip_user::cli::HavipdCli::parse()) {
        eprintln!("havipd: {e:#}");
        std::process::exit(1);
    }
}
