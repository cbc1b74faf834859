//! TLS against a real PostgreSQL with its own certificate authority: every `sslmode`, trusted
//! and untrusted roots, matching and mismatching host names.

use backplane_postgres::{PgBackplane, PgOptions, doctor};
use backplane_test_support::{Cluster, TestPki};

fn pki() -> TestPki {
    TestPki::generate("postgres-tls").expect("test certificates")
}

fn read(pki: &TestPki, file: &str) -> String {
    pki.read(file)
}

fn url(cluster: &Cluster, host: &str, query: &str) -> String {
    format!(
        "postgres://postgres:not-the-password@{host}:{}/postgres?hostaddr=127.0.0.1&schema=tls_test&{query}",
        cluster.port()
    )
}

async fn tls_state(url: &str) -> Result<String, String> {
    let options: PgOptions = url
        .parse()
        .map_err(|e: backplane_core::Error| e.to_string())?;
    let checks = doctor(&options).await;
    let tls = checks
        .iter()
        .find(|c| c.name == "tls")
        .ok_or_else(|| format!("no tls check: {checks:?}"))?;
    tls.outcome.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_against_a_tls_server() {
    let pki = pki();
    let (cert, key) = (read(&pki, "server.crt"), read(&pki, "server.key"));
    let cluster = tokio::task::spawn_blocking(move || Cluster::start_with_tls(Some((&cert, &key))))
        .await
        .expect("cluster task")
        .expect("a TLS cluster starts");
    let ca = pki.path("ca.pem").display().to_string();
    let other = pki.path("other-ca.pem").display().to_string();

    // verify-full with the right CA and host name: encrypted, and the driver works over it.
    let good = url(
        &cluster,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let state = tls_state(&good).await.expect("verify-full connects");
    assert!(state.starts_with("encrypted with TLS"), "{state}");
    let backplane = PgBackplane::connect(&good)
        .await
        .expect("driver connects over TLS");
    assert_eq!(backplane.schema_version().await.expect("query over TLS"), 1);

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let by_ip = url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let err = PgBackplane::connect(&by_ip)
        .await
        .expect_err("name mismatch");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");
    let ca_only = url(
        &cluster,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    assert!(
        tls_state(&ca_only)
            .await
            .expect("verify-ca connects")
            .starts_with("encrypted")
    );

    // An untrusted root fails both verifying modes.
    for mode in ["verify-ca", "verify-full"] {
        let untrusted = url(
            &cluster,
            "localhost",
            &format!("sslmode={mode}&sslrootcert={other}"),
        );
        let err = PgBackplane::connect(&untrusted)
            .await
            .expect_err("untrusted CA");
        assert!(err.to_string().contains("certificate"), "{mode}: {err}");
    }

    // require and prefer encrypt without checking; disable does not encrypt.
    for mode in ["require", "prefer"] {
        let state = tls_state(&url(&cluster, "127.0.0.1", &format!("sslmode={mode}")))
            .await
            .expect("connects");
        assert!(state.starts_with("encrypted"), "{mode}: {state}");
    }
    let state = tls_state(&url(&cluster, "127.0.0.1", "sslmode=disable"))
        .await
        .expect("connects");
    assert!(state.starts_with("not encrypted"), "{state}");
}
