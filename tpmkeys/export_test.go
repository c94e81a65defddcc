package tpmkeys

// Test-only exports for the external test package (tpmkeys_test), which may import
// internal/testenv without an import cycle even if testenv comes to import tpmkeys.
var (
	OpenSimForTest       = openSim
	TestCtxForTest       = testCtx
	LoadedHandlesForTest = loadedHandles
)
