#pragma once
/// @file saddlescape.hpp
/// Umbrella header: everything a C++ caller of saddlescape::core needs.

#include <saddlescape/errors.hpp>
#include <saddlescape/matrix_functions.hpp>
#include <saddlescape/schedules.hpp>
#include <saddlescape/estimators.hpp>
#include <saddlescape/block_engine.hpp>
#include <saddlescape/diag_step.hpp>
#include <saddlescape/rng.hpp>
#include <saddlescape/problems.hpp>
#include <saddlescape/optimizers.hpp>
#include <saddlescape/runner.hpp>
