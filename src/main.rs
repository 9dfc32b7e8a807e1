use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    engaged::cli::main().await
}
