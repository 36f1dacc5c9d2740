fn main() {
    println!("{}", netwatch::capture::EBPF_OBJECT.len());
}
