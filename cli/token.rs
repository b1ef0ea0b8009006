//! `dvcr token`: signing keys and scoped registry tokens, for operators and
//! tests (in a cluster the controller issues tokens itself).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use dvcr_registry::auth::token::{self, AccessEntry, TokenIssuer};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Write a new EC P-256 key pair: the private key signs tokens, `dvcr serve --token-public-key` checks them.
    Keygen {
        /// Where to write the PEM PKCS#8 private key (created with mode 0600).
        #[arg(long)]
        private_key: PathBuf,
        /// Where to write the PEM public key.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Print a token granting the given access.
    Issue {
        /// The PEM PKCS#8 EC P-256 private key to sign with.
        #[arg(long)]
        private_key: PathBuf,
        /// What the token allows, as TYPE:NAME:ACTIONS, e.g. repository:vi/ns/name:pull,push; repeatable.
        #[arg(long = "access", required = true)]
        access: Vec<String>,
        /// How long the token is valid (30s, 15m, 1h).
        #[arg(long, value_parser = crate::transfer::parse_duration, default_value = "15m")]
        lifetime: Duration,
        /// Who the token is for (the `sub` claim, shown in the registry's logs).
        #[arg(long)]
        subject: Option<String>,
        /// The `iss` claim.
        #[arg(long, default_value = token::DEFAULT_ISSUER)]
        issuer: String,
        /// The `aud` claim.
        #[arg(long, default_value = token::DEFAULT_AUDIENCE)]
        audience: String,
    },
}

fn write_new(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (an existing file is never overwritten)", path.display()))?;
    file.write_all(content.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs a `dvcr token` subcommand.
pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Keygen { private_key, public_key } => {
            let (private_pem, public_pem) = token::generate_key_pair()?;
            write_new(&private_key, &private_pem, 0o600)?;
            write_new(&public_key, &public_pem, 0o644)?;
            Ok(())
        }
        TokenCommand::Issue {
            private_key,
            access,
            lifetime,
            subject,
            issuer,
            audience,
        } => {
            let key = std::fs::read(&private_key).with_context(|| format!("cannot read the private key {}", private_key.display()))?;
            let issuer = TokenIssuer::new(&key, &issuer, &audience).with_context(|| format!("cannot use {}", private_key.display()))?;
            let access = access.iter().map(|text| AccessEntry::parse(text)).collect::<Result<Vec<_>, _>>()?;
            println!("{}", issuer.issue(subject.as_deref(), access, lifetime)?);
            Ok(())
        }
    }
}
