//! `dvcr controller`: the controller's commands. For now the CRDs; the
//! reconcilers come with issue 6's next parts.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ControllerCommand {
    /// Write the CustomResourceDefinitions of the virtualization.deckhouse.io resources, one YAML file each.
    Crds {
        /// Folder to write them into (deploy/base/crds in this repository); standard output when not given.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
}

pub fn run(command: ControllerCommand) -> anyhow::Result<()> {
    match command {
        ControllerCommand::Crds { output_dir } => {
            let files = dvcr_controller::crds::render_crd_files()?;
            match output_dir {
                None => {
                    let documents: Vec<&str> =
                        files.iter().map(|file| file.content.as_str()).collect();
                    print!("{}", documents.join("---\n"));
                }
                Some(folder) => {
                    std::fs::create_dir_all(&folder)
                        .with_context(|| format!("cannot create {}", folder.display()))?;
                    for file in files {
                        let path = folder.join(&file.file_name);
                        std::fs::write(&path, &file.content)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                    }
                }
            }
            Ok(())
        }
    }
}
