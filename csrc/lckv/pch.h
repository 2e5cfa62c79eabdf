// Precompiled header: torch/torch.h costs ~20 s per translation unit to parse.
#pragma once
#include <torch/torch.h>
#include <nlohmann/json.hpp>
