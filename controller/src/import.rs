//! Pure pieces of the image import: where an image is stored, the `dvcr
//! import` command an importer Pod runs, and the status read back from the
//! importer's progress gauges and final report. No I/O here; the
//! reconcilers feed these with what they observe.

use std::collections::BTreeMap;

use dvcr_importer::progress::Report;

use crate::api::common::{DataSource, DataSourceType, DownloadSpeed, ImageSize, ObjectRefKind};

/// Longest `host/repository` a registry reference may have.
const MAX_REFERENCE: usize = 255;

/// Failures turning a resource into import work; each names what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportSpecError {
    /// `dataSource.type` names a field that is not filled.
    #[error("dataSource.type is {0:?} but dataSource.{1} is missing")]
    MissingSource(DataSourceType, &'static str),
    /// An upload is not imported by an importer Pod.
    #[error("dataSource.type Upload is served by an uploader, not an importer")]
    UploadHasNoImporter,
    /// The final report is not the importer's JSON.
    #[error("the importer's report is not valid: {0}")]
    Report(String),
}

/// Which registry repository family a resource's image lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageOwner<'a> {
    /// A VirtualImage: `vi/<namespace>/<name>`.
    VirtualImage { namespace: &'a str, name: &'a str },
    /// A ClusterVirtualImage: `cvi/<name>`.
    ClusterVirtualImage { name: &'a str },
    /// A VirtualDisk's intermediate copy: `vd/<namespace>/<name>`.
    VirtualDisk { namespace: &'a str, name: &'a str },
}

/// 64-bit FNV-1a.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The repository of an image in the registry at `host` (reference, section
/// 1). When `host/repository` is longer than 255 characters, the name is cut,
/// trailing `-._` stripped, and `-` plus 16 hex digits of the FNV-1a hash of
/// the full original repository appended, so that long names stay distinct.
pub fn repository(host: &str, owner: ImageOwner<'_>) -> String {
    let (prefix, name) = match owner {
        ImageOwner::VirtualImage { namespace, name } => (format!("vi/{namespace}/"), name),
        ImageOwner::ClusterVirtualImage { name } => ("cvi/".to_string(), name),
        ImageOwner::VirtualDisk { namespace, name } => (format!("vd/{namespace}/"), name),
    };
    let full = format!("{prefix}{name}");
    if host.len() + 1 + full.len() <= MAX_REFERENCE {
        return full;
    }
    let suffix = format!("-{:016x}", fnv1a64(full.as_bytes()));
    let room = MAX_REFERENCE.saturating_sub(host.len() + 1 + prefix.len() + suffix.len());
    // Names are DNS labels (ASCII), so cutting at a byte is cutting at a character.
    let cut: String = name.chars().take(room).collect();
    format!("{prefix}{}{suffix}", cut.trim_end_matches(['-', '.', '_']))
}

/// Files an importer Pod has mounted for its command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountedFiles {
    /// The source's CA bundle (from `caBundle`).
    pub source_ca_bundle: Option<String>,
    /// The source registry's pull secret (a dockerconfigjson).
    pub auth_file: Option<String>,
    /// The scoped token for the destination repository.
    pub registry_token_file: Option<String>,
    /// The registry's CA.
    pub registry_ca_bundle: Option<String>,
}

/// The arguments of `dvcr` in an importer Pod: `import SOURCE DESTINATION`
/// with checksums, credentials, progress gauges on `metrics_listen` and the
/// report in the termination-message file. `source_reference` resolves an
/// `objectRef` to the registry reference of the object's stored image.
pub fn import_args(
    source: &DataSource,
    destination: &str,
    owner_uid: &str,
    files: &MountedFiles,
    metrics_listen: &str,
    source_reference: impl Fn(ObjectRefKind, &str, Option<&str>) -> Result<String, ImportSpecError>,
) -> Result<Vec<String>, ImportSpecError> {
    let mut args = vec!["import".to_string()];
    match source.source_type {
        DataSourceType::Http => {
            let http = source
                .http
                .as_ref()
                .ok_or(ImportSpecError::MissingSource(source.source_type, "http"))?;
            args.push(http.url.clone());
            if let Some(checksum) = &http.checksum {
                let given = [
                    ("md5", &checksum.md5),
                    ("sha1", &checksum.sha1),
                    ("sha256", &checksum.sha256),
                    ("sha512", &checksum.sha512),
                ];
                for (algorithm, hex) in given {
                    if let Some(hex) = hex {
                        args.push(format!(
                            "--checksum={algorithm}:{}",
                            hex.to_ascii_lowercase()
                        ));
                    }
                }
            }
        }
        DataSourceType::ContainerImage => {
            let image = source
                .container_image
                .as_ref()
                .ok_or(ImportSpecError::MissingSource(
                    source.source_type,
                    "containerImage",
                ))?;
            args.push(format!("docker://{}", image.image));
        }
        DataSourceType::ObjectRef => {
            let object = source
                .object_ref
                .as_ref()
                .ok_or(ImportSpecError::MissingSource(
                    source.source_type,
                    "objectRef",
                ))?;
            args.push(format!(
                "docker://{}",
                source_reference(object.kind, &object.name, object.namespace.as_deref())?
            ));
        }
        DataSourceType::Upload => return Err(ImportSpecError::UploadHasNoImporter),
    }
    args.push(destination.to_string());
    push_worker_flags(&mut args, files, owner_uid, metrics_listen);
    Ok(args)
}

/// The arguments of `dvcr` in an importer Pod reading an image kept in a
/// PVC, mounted at `path`: stored as the raw disk (or ISO) it is, never
/// probed, for its `bytes` only (a volume may be larger than its image).
pub fn claim_import_args(
    path: &str,
    bytes: u64,
    cdrom: bool,
    destination: &str,
    owner_uid: &str,
    files: &MountedFiles,
    metrics_listen: &str,
) -> Vec<String> {
    let format = if cdrom { "iso" } else { "raw" };
    let mut args = vec![
        "import".to_string(),
        path.to_string(),
        destination.to_string(),
        format!("--source-format={format}"),
        format!("--source-length={bytes}"),
    ];
    push_worker_flags(&mut args, files, owner_uid, metrics_listen);
    args
}

/// Credentials, progress gauges and the report file of an importer.
fn push_worker_flags(args: &mut Vec<String>, files: &MountedFiles, owner_uid: &str, metrics_listen: &str) {
    let optional = [
        ("--ca-bundle", &files.source_ca_bundle),
        ("--auth-file", &files.auth_file),
        ("--registry-token-file", &files.registry_token_file),
        ("--registry-ca-bundle", &files.registry_ca_bundle),
    ];
    for (flag, path) in optional {
        if let Some(path) = path {
            args.push(format!("{flag}={path}"));
        }
    }
    args.push(format!("--owner-uid={owner_uid}"));
    args.push(format!("--metrics-listen={metrics_listen}"));
    args.push("--report-file=/dev/termination-log".to_string());
}

/// Progress of a running import, as read from its gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImportProgress {
    /// Percent done (0-100), if the source's length is known.
    pub percent: Option<f64>,
    /// Average speed, bytes per second.
    pub average_speed: Option<f64>,
    /// Current speed, bytes per second.
    pub current_speed: Option<f64>,
}

/// Reads the importer's gauges for `owner_uid` from a Prometheus text page;
/// other owners' samples and unknown lines are ignored.
pub fn parse_progress(metrics: &str, owner_uid: &str) -> ImportProgress {
    let mut values: BTreeMap<&str, f64> = BTreeMap::new();
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let owner = format!("ownerUID=\"{owner_uid}\"");
        if !labels
            .trim_end_matches('}')
            .split(',')
            .any(|label| label.trim() == owner)
        {
            continue;
        }
        values.insert(name.trim(), value);
    }
    let finite = |name: &str| {
        values
            .get(name)
            .copied()
            .filter(|value| value.is_finite() && *value >= 0.0)
    };
    ImportProgress {
        percent: finite("registry_progress").map(|percent| percent.min(100.0)),
        average_speed: finite("registry_average_speed"),
        current_speed: finite("registry_current_speed"),
    }
}

/// [`progress_text`] of a step that is `share` of the whole and starts at
/// `from` percent: an imported disk's import is its first half.
pub fn share_text(progress: &ImportProgress, from: f64, share: f64, previous: Option<&str>) -> Option<String> {
    let scaled = ImportProgress {
        percent: progress.percent.map(|percent| from + percent * share),
        ..*progress
    };
    progress_text(&scaled, previous)
}

/// `status.progress` while importing: never below what was shown before, and
/// never `100%` before the image is Ready (the last percent covers the
/// config, the manifest and the tag).
pub fn progress_text(progress: &ImportProgress, previous: Option<&str>) -> Option<String> {
    let shown = previous
        .and_then(|text| text.trim_end_matches('%').parse::<f64>().ok())
        .unwrap_or(0.0);
    let percent = progress.percent?.clamp(0.0, 99.9).max(shown.min(99.9));
    Some(format!("{:.1}%", (percent * 10.0).floor() / 10.0))
}

/// `status.downloadSpeed` from the gauges.
pub fn download_speed(progress: &ImportProgress) -> DownloadSpeed {
    let speed = |bytes: Option<f64>| {
        bytes.map(|bytes| {
            (
                format!("{}/s", human_bytes(bytes as u64)),
                format!("{}", bytes as u64),
            )
        })
    };
    let (avg, avg_bytes) = speed(progress.average_speed).unzip();
    let (current, current_bytes) = speed(progress.current_speed).unzip();
    DownloadSpeed {
        avg,
        avg_bytes,
        current,
        current_bytes,
    }
}

/// Sizes in binary units as Kubernetes writes them: `512B`, `1.5Ki`, `20.0Gi`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// What a finished import tells the status.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportOutcome {
    /// Stored: sizes, format, and whether it is a CD-ROM.
    Stored {
        size: ImageSize,
        format: String,
        cdrom: bool,
    },
    /// Failed: the importer's message and reason (`BadImageChecksum`, ...).
    Failed { message: String, reason: String },
}

/// Reads the report an importer left in its termination message.
pub fn parse_report(text: &str) -> Result<ImportOutcome, ImportSpecError> {
    let report: Report =
        serde_json::from_str(text.trim()).map_err(|error| ImportSpecError::Report(error.to_string()))?;
    if let Some(message) = report.error_message.filter(|message| !message.is_empty()) {
        let reason = report.reason.filter(|reason| !reason.is_empty()).unwrap_or_else(|| "ImporterFailed".into());
        return Ok(ImportOutcome::Failed { message, reason });
    }
    if report.source_image_format.is_empty() {
        return Err(ImportSpecError::Report("a successful report lacks the format".into()));
    }
    let (stored, unpacked) = (report.source_image_size, report.source_image_virtual_size);
    Ok(ImportOutcome::Stored {
        size: ImageSize {
            stored: Some(human_bytes(stored)),
            stored_bytes: Some(stored.to_string()),
            unpacked: Some(human_bytes(unpacked)),
            unpacked_bytes: Some(unpacked.to_string()),
        },
        cdrom: report.cdrom || report.source_image_format == "iso",
        format: report.source_image_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::{Checksum, ContainerImageSource, HttpSource, ObjectRefSource};

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn repositories_follow_the_layout_and_long_ones_are_cut_with_a_hash() {
        let host = "dvcr.dvcr.svc";
        assert_eq!(
            repository(
                host,
                ImageOwner::VirtualImage {
                    namespace: "vms",
                    name: "ubuntu"
                }
            ),
            "vi/vms/ubuntu"
        );
        assert_eq!(
            repository(host, ImageOwner::ClusterVirtualImage { name: "debian" }),
            "cvi/debian"
        );
        assert_eq!(
            repository(
                host,
                ImageOwner::VirtualDisk {
                    namespace: "vms",
                    name: "root"
                }
            ),
            "vd/vms/root"
        );

        let namespace = "n".repeat(63);
        let exact = "a".repeat(MAX_REFERENCE - host.len() - 1 - "vi//".len() - namespace.len());
        let fits = repository(
            host,
            ImageOwner::VirtualImage {
                namespace: &namespace,
                name: &exact,
            },
        );
        assert_eq!(
            host.len() + 1 + fits.len(),
            MAX_REFERENCE,
            "exactly 255 is kept as it is"
        );
        assert!(fits.ends_with(&exact));

        let long = format!("{}-.x{}", "b".repeat(150), "c".repeat(100));
        let cut = repository(
            host,
            ImageOwner::VirtualImage {
                namespace: &namespace,
                name: &long,
            },
        );
        assert_eq!(host.len() + 1 + cut.len(), MAX_REFERENCE);
        let full = format!("vi/{namespace}/{long}");
        assert!(
            cut.ends_with(&format!("-{:016x}", fnv1a64(full.as_bytes()))),
            "{cut}"
        );
        let other = repository(
            host,
            ImageOwner::VirtualImage {
                namespace: &namespace,
                name: &format!("{long}d"),
            },
        );
        assert_ne!(
            cut, other,
            "two long names that share the kept part differ by their hash"
        );
        // A cut that ends in a separator drops it before the hash.
        let room = MAX_REFERENCE - host.len() - 1 - format!("vi/{namespace}/").len() - 17;
        let separator_at_cut = format!("{}-.{}", "e".repeat(room - 2), "f".repeat(50));
        let trimmed = repository(
            host,
            ImageOwner::VirtualImage {
                namespace: &namespace,
                name: &separator_at_cut,
            },
        );
        assert!(!trimmed.contains("-.-"), "{trimmed}");
        assert!(trimmed.contains(&format!("{}-", "e".repeat(room - 2))));
    }

    fn no_object(_: ObjectRefKind, _: &str, _: Option<&str>) -> Result<String, ImportSpecError> {
        unreachable!("no objectRef here")
    }

    #[test]
    fn http_sources_become_a_url_with_checksums_and_the_report_file() {
        let source = DataSource {
            source_type: DataSourceType::Http,
            http: Some(HttpSource {
                url: "https://images.example/jammy.qcow2.xz".into(),
                ca_bundle: Some("LS0t".into()),
                checksum: Some(Checksum {
                    sha256: Some("AB".repeat(32)),
                    md5: Some("c".repeat(32)),
                    ..Default::default()
                }),
            }),
            container_image: None,
            object_ref: None,
        };
        let files = MountedFiles {
            source_ca_bundle: Some("/etc/dvcr/source-ca/ca.crt".into()),
            registry_token_file: Some("/etc/dvcr/token/token".into()),
            ..Default::default()
        };
        let args = import_args(
            &source,
            "dvcr.dvcr.svc/vi/vms/jammy:uid-1",
            "uid-1",
            &files,
            "0.0.0.0:8080",
            no_object,
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "import",
                "https://images.example/jammy.qcow2.xz",
                &format!("--checksum=md5:{}", "c".repeat(32)),
                &format!("--checksum=sha256:{}", "ab".repeat(32)),
                "dvcr.dvcr.svc/vi/vms/jammy:uid-1",
                "--ca-bundle=/etc/dvcr/source-ca/ca.crt",
                "--registry-token-file=/etc/dvcr/token/token",
                "--owner-uid=uid-1",
                "--metrics-listen=0.0.0.0:8080",
                "--report-file=/dev/termination-log",
            ]
        );
    }

    #[test]
    fn container_images_object_refs_and_uploads() {
        let mut source = DataSource {
            source_type: DataSourceType::ContainerImage,
            http: None,
            container_image: Some(ContainerImageSource {
                image: "quay.io/x/disk:1".into(),
                image_pull_secret: None,
                ca_bundle: None,
            }),
            object_ref: None,
        };
        let files = MountedFiles {
            auth_file: Some("/pull/.dockerconfigjson".into()),
            ..Default::default()
        };
        let args = import_args(
            &source,
            "d/vi/a/b:u",
            "u",
            &files,
            "0.0.0.0:8080",
            no_object,
        )
        .unwrap();
        assert_eq!(
            &args[..3],
            ["import", "docker://quay.io/x/disk:1", "d/vi/a/b:u"]
        );
        assert!(args.contains(&"--auth-file=/pull/.dockerconfigjson".to_string()));

        source.source_type = DataSourceType::ObjectRef;
        source.object_ref = Some(ObjectRefSource {
            kind: ObjectRefKind::ClusterVirtualImage,
            name: "debian".into(),
            namespace: None,
        });
        let resolve = |kind, name: &str, namespace: Option<&str>| {
            assert_eq!(
                (kind, namespace),
                (ObjectRefKind::ClusterVirtualImage, None)
            );
            Ok(format!("d/cvi/{name}:uid-9"))
        };
        let args = import_args(
            &source,
            "d/vi/a/b:u",
            "u",
            &MountedFiles::default(),
            "0.0.0.0:8080",
            resolve,
        )
        .unwrap();
        assert_eq!(
            args[1], "docker://d/cvi/debian:uid-9",
            "a registry-side copy: the importer mounts it"
        );

        source.object_ref = None;
        assert_eq!(
            import_args(&source, "d", "u", &MountedFiles::default(), "a", no_object),
            Err(ImportSpecError::MissingSource(
                DataSourceType::ObjectRef,
                "objectRef"
            ))
        );
        source.source_type = DataSourceType::Upload;
        assert_eq!(
            import_args(&source, "d", "u", &MountedFiles::default(), "a", no_object),
            Err(ImportSpecError::UploadHasNoImporter)
        );
    }

    const METRICS: &str = "# HELP registry_progress Import progress\n\
        # TYPE registry_progress gauge\n\
        registry_progress{ownerUID=\"other\"} 90\n\
        registry_progress{ownerUID=\"uid-1\"} 47.63\n\
        registry_average_speed{ownerUID=\"uid-1\"} 99857612\n\
        registry_current_speed{ownerUID=\"uid-1\"} NaN\n\
        garbage line\n";

    #[test]
    fn progress_is_read_for_its_owner_only_and_never_reaches_100_before_ready() {
        let progress = parse_progress(METRICS, "uid-1");
        assert_eq!(progress.percent, Some(47.63));
        assert_eq!(progress.average_speed, Some(99857612.0));
        assert_eq!(progress.current_speed, None, "NaN is no speed");
        assert_eq!(progress_text(&progress, None).as_deref(), Some("47.6%"));
        assert_eq!(
            progress_text(&progress, Some("52.0%")).as_deref(),
            Some("52.0%"),
            "never goes back"
        );
        let done = ImportProgress {
            percent: Some(100.0),
            average_speed: None,
            current_speed: None,
        };
        assert_eq!(
            progress_text(&done, Some("99.0%")).as_deref(),
            Some("99.9%")
        );
        assert_eq!(
            progress_text(
                &ImportProgress {
                    percent: None,
                    average_speed: None,
                    current_speed: None
                },
                None
            ),
            None
        );
        assert_eq!(parse_progress(METRICS, "nobody").percent, None);
        let speed = download_speed(&progress);
        assert_eq!(speed.avg.as_deref(), Some("95.2Mi/s"));
        assert_eq!(speed.avg_bytes.as_deref(), Some("99857612"));
        assert_eq!(speed.current, None);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1536), "1.5Ki");
        assert_eq!(human_bytes(20 << 30), "20.0Gi");
        assert_eq!(human_bytes(u64::MAX), "16.0Ei");
    }

    #[test]
    fn reports_become_sizes_or_the_failure_message() {
        let stored = parse_report(
            r#"{"source-image-size":2361393152,"source-image-virtual-size":10737418240,"source-image-format":"iso","duration":1,"average-speed":5}"#,
        )
        .unwrap();
        let ImportOutcome::Stored {
            size,
            format,
            cdrom,
        } = stored
        else {
            panic!("{stored:?}")
        };
        assert_eq!((format.as_str(), cdrom), ("iso", true));
        assert_eq!(size.stored.as_deref(), Some("2.2Gi"));
        assert_eq!(size.unpacked_bytes.as_deref(), Some("10737418240"));
        assert_eq!(
            parse_report(
                r#"{"error-message":"checksum mismatch: sha256 expected ab, got cd","reason":"BadImageChecksum"}"#
            )
            .unwrap(),
            ImportOutcome::Failed {
                message: "checksum mismatch: sha256 expected ab, got cd".into(),
                reason: "BadImageChecksum".into()
            }
        );
        assert!(matches!(
            parse_report("not json"),
            Err(ImportSpecError::Report(_))
        ));
        assert_eq!(
            parse_report(r#"{"error-message":"killed"}"#).unwrap(),
            ImportOutcome::Failed { message: "killed".into(), reason: "ImporterFailed".into() },
            "a failure without a reason still fails"
        );
        assert!(matches!(parse_report("{}"), Err(ImportSpecError::Report(_))), "no format: not a stored image");
        // What the importer writes is what the controller reads.
        let written = Report {
            source_image_size: 5,
            source_image_virtual_size: 7,
            source_image_format: "qcow2".into(),
            ..Default::default()
        };
        let written = serde_json::to_string(&written).unwrap();
        let ImportOutcome::Stored { format, cdrom, size } = parse_report(&written).unwrap()
        else {
            panic!("a stored report")
        };
        assert_eq!((format.as_str(), cdrom, size.unpacked_bytes.as_deref()), ("qcow2", false, Some("7")));
    }
}
