fn main() {
    std::process::exit(stowix::cli::run());
}
