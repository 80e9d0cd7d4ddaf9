//! The served OpenAPI document covers every operation of the contract with the same method, path and statuses.

use serde_json::Value;

use crate::support::{Backend, TestApp};

crate::on_both!(served_document_covers_the_contract);

async fn served_document_covers_the_contract(b: Backend) {
    let app = TestApp::on(b).await;
    let served: Value = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
    let contract: Value = serde_yaml::from_str(include_str!("../../spec/gotowebinar-webhooks-openapi.yml")).unwrap();
    let mut checked = 0;
    for (path, ops) in contract["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let ours_path = format!("/G2W/rest/v2{path}");
            let ours = &served["paths"][&ours_path][method];
            assert!(ours.is_object(), "{method} {ours_path} is missing from /openapi.json");
            assert_eq!(ours["operationId"], op["operationId"], "{method} {path}");
            for status in op["responses"].as_object().unwrap().keys() {
                assert!(
                    ours["responses"][status].is_object(),
                    "{method} {path} lacks status {status}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9, "the contract has nine operations");
    // The admin API is documented too.
    assert!(served["paths"]["/admin/v1/events"]["post"].is_object());
}
