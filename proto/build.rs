//! Generates the `certfleet.v1` code with the protoc that `protoc-bin-vendored`
//! ships, so a plain `cargo build` needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Carries a private key: its Debug is written by hand, redacting it.
        .skip_debug([
            "certfleet.v1.InstallCertificateRequest",
            "certfleet.v1.JoinRequest",
            "certfleet.v1.AddNodeResponse",
            "certfleet.v1.ImportRequest",
        ])
        .compile_with_config(
            config,
            &[
                "certfleet/v1/agent.proto",
                "certfleet/v1/admin.proto",
                "certfleet/v1/enrollment.proto",
            ],
            &["."],
        )?;
    Ok(())
}
