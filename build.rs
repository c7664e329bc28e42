//! Generates the server side of containerd's snapshots gRPC service
//! (`containerd.services.snapshots.v1.Snapshots`) for `src/snapshotter/grpc.rs`.
//!
//! `containerd-client` ships containerd's protos compiled to prost messages but only client
//! stubs; the server trait and router are generated here with tonic-build's manual builder
//! over those message types, so no protobuf is written or compiled in this crate.

fn main() {
    use tonic_build::manual::{Builder, Method, Service};
    const MSG: &str = "containerd_client::services::v1::snapshots";
    let method = |name: &str, route: &str, input: &str, output: &str| {
        let path = |t: &str| {
            if t == "Empty" {
                // google.protobuf.Empty is `()` in prost; the builder wants a path.
                "crate::snapshotter::grpc::Empty".to_string()
            } else {
                format!("{MSG}::{t}")
            }
        };
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(path(input))
            .output_type(path(output))
            .codec_path("tonic_prost::ProstCodec")
    };
    let unary = |name: &str, route: &str, input: &str, output: &str| {
        method(name, route, input, output).build()
    };
    let service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1")
        .method(unary(
            "prepare",
            "Prepare",
            "PrepareSnapshotRequest",
            "PrepareSnapshotResponse",
        ))
        .method(unary(
            "view",
            "View",
            "ViewSnapshotRequest",
            "ViewSnapshotResponse",
        ))
        .method(unary("mounts", "Mounts", "MountsRequest", "MountsResponse"))
        .method(unary("commit", "Commit", "CommitSnapshotRequest", "Empty"))
        .method(unary("remove", "Remove", "RemoveSnapshotRequest", "Empty"))
        .method(unary(
            "stat",
            "Stat",
            "StatSnapshotRequest",
            "StatSnapshotResponse",
        ))
        .method(unary(
            "update",
            "Update",
            "UpdateSnapshotRequest",
            "UpdateSnapshotResponse",
        ))
        .method(
            method(
                "list",
                "List",
                "ListSnapshotsRequest",
                "ListSnapshotsResponse",
            )
            .server_streaming()
            .build(),
        )
        .method(unary("usage", "Usage", "UsageRequest", "UsageResponse"))
        .method(unary("cleanup", "Cleanup", "CleanupRequest", "Empty"))
        .build();
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
