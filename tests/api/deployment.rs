//! `docker/compose.yaml` as documented: PostgreSQL and an S3 server with its bucket made, the API
//! and a worker from one image built once, really using both (artifacts on `s3://`), a data
//! volume and healthchecks. Docker cannot run in CI here, so this reads the file and checks that
//! every setting it passes is one compressd reads.

use serde_yaml::Value;

fn compose() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/compose.yaml");
    let mut value: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // `<<: *compressd` merges, as Compose does.
    value.apply_merge().unwrap();
    value
}

#[test]
fn compose_runs_api_and_worker_from_one_image_on_postgres_and_s3() {
    let compose = compose();
    let services = &compose["services"];
    let (api, worker) = (&services["api"], &services["worker"]);
    // One image, built once (by the api service), used by both.
    assert_eq!(api["image"], worker["image"]);
    assert!(api["build"].is_mapping() && worker["build"].is_null());
    assert_eq!(worker["pull_policy"], "never");
    assert_eq!(api["command"][0], "serve");
    assert_eq!(worker["command"][0], "worker");

    for service in [api, worker] {
        let env = &service["environment"];
        assert!(env["COMPRESSD_DATABASE_URL"]
            .as_str()
            .unwrap()
            .starts_with("postgres://"));
        assert!(env["COMPRESSD_ARTIFACTS_URL"]
            .as_str()
            .unwrap()
            .starts_with("s3://compressd/"));
        assert_eq!(env["COMPRESSD_S3_ENDPOINT"], "http://s3:5000");
        // Every variable is one of compressd's settings, spelled as its environment form.
        let settings = compressd::settings::Settings::keys();
        for name in env.as_mapping().unwrap().keys() {
            let name = name.as_str().unwrap();
            let key = name.strip_prefix("COMPRESSD_").unwrap().to_lowercase();
            assert!(settings.iter().any(|s| *s == key), "{name} is no setting");
        }
        assert!(service["volumes"][0]
            .as_str()
            .unwrap()
            .ends_with(":/var/lib/compressd/data"));
        assert_eq!(
            service["depends_on"]["s3-bucket"]["condition"],
            "service_completed_successfully"
        );
    }
    // The bucket the artifacts URL names is made before either starts.
    let bucket = &services["s3-bucket"]["command"];
    assert!(bucket
        .as_sequence()
        .unwrap()
        .iter()
        .any(|a| a == "http://s3:5000/compressd"));
    for name in ["postgres", "s3", "api"] {
        assert!(
            services[name]["healthcheck"]["test"].is_sequence(),
            "{name}"
        );
    }
    assert!(compose["volumes"]["data"].is_null() || compose["volumes"]["data"].is_mapping());
}

#[test]
fn the_image_build_context_leaves_out_build_outputs() {
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore")).unwrap();
    for entry in ["target/", ".git/"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), "{entry}");
    }
}
