// Writing small files so that a reader never sees half of one: write a temp file in the
// same directory, flush, rename over the target. (Large tensors: models/safetensors.h.)
#pragma once
#include <filesystem>
#include <string_view>

namespace zo2 {

// Throws Error(io) naming the path; on failure the old file (if any) is untouched.
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

}  // namespace zo2
