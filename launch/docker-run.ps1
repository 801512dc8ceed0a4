# The reference deployment's script: the same verbs as launch/docker-run.sh.
#   .\launch\docker-run.ps1 build
#   .\launch\docker-run.ps1 run-coordinator
#   .\launch\docker-run.ps1 run-worker 0        (then 1, 2, 3)
#   .\launch\docker-run.ps1 status
#   .\launch\docker-run.ps1 stop
# $env:MODELS = "C:\path\to\models" mounts its partitions folder (your own split) read-only; $env:HTTP_PORT,
# $env:METRICS_PORT (host ports, default 8000 and 9091 + N) and $env:PREFIX (container names, default chatloop)
# let a second deployment run beside the first. Closed by default: ports are published on $env:PUBLISH_ADDR
# (default 127.0.0.1, this host only); publishing the HTTP API elsewhere needs $env:CHATLOOP_API_KEY or
# $env:API_KEY_FILE (mounted read-only as a secret), else the script refuses.
# Restart policy: unless-stopped (as launch/docker-run.sh, which says why). A worker container stopped by hand
# stays stopped; the coordinator names it and the command that brings it back (docker start chatloop-worker-2),
# from CHATLOOP_CONTAINER and CHATLOOP_CONTAINER_ENGINE given to each worker below.
param(
    [Parameter(Position = 0)][ValidateSet("build", "run-coordinator", "run-worker", "status", "stop")][string]$Verb,
    [Parameter(Position = 1)][string]$Worker,
    [Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest
)
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
$Image = if ($env:IMAGE) { $env:IMAGE } else { "chatloop-all-in-one:latest" }
$Network = if ($env:NETWORK) { $env:NETWORK } else { "chatloop" }
$Prefix = if ($env:PREFIX) { $env:PREFIX } else { "chatloop" }
$HttpPort = if ($env:HTTP_PORT) { [int]$env:HTTP_PORT } else { 8000 }
$MetricsPort = if ($env:METRICS_PORT) { [int]$env:METRICS_PORT } else { 9091 }
$Restart = "unless-stopped"
$Publish = if ($env:PUBLISH_ADDR) { $env:PUBLISH_ADDR } else { "127.0.0.1" }
$OnLoopback = $Publish -match '^(127\.|localhost$|::1$|\[::1\]$)'
$Key = @()
if ($env:API_KEY_FILE) { $Key = @("-v", "$((Resolve-Path $env:API_KEY_FILE).Path):/run/secrets/chatloop_api_key:ro") }
elseif ($env:CHATLOOP_API_KEY) { $Key = @("-e", "CHATLOOP_API_KEY") }
$Mounts = @()
if ($env:MODELS) { $Mounts = @("-v", "$((Resolve-Path $env:MODELS).Path)/partitions:/home/chatloop/models/partitions:ro") }

function Ensure-Network {
    docker network inspect $Network *> $null
    if ($LASTEXITCODE -ne 0) { docker network create $Network | Out-Null }
}

switch ($Verb) {
    "build" { docker build -f launch/Dockerfile -t $Image . }
    "run-coordinator" {
        if (-not $OnLoopback -and $Key.Count -eq 0) {
            [Console]::Error.WriteLine("docker-run.ps1: refusing to publish the HTTP API on $Publish without an API key: " +
                "anyone who reaches that " +
                "address could use the model. Set CHATLOOP_API_KEY (or API_KEY_FILE), or PUBLISH_ADDR=127.0.0.1 (the default).")
            exit 2
        }
        Ensure-Network
        docker run -d --name "${Prefix}-coordinator" --network $Network --network-alias coordinator `
            --restart $Restart -e CHATLOOP_ROLE=coordinator -e "CHATLOOP_PUBLISH_ADDR=$Publish" @Key `
            -p "${Publish}:${HttpPort}:8000" @Mounts $Image @Rest
    }
    "run-worker" {
        if ($Worker -notmatch '^\d+$') { throw "usage: docker-run.ps1 run-worker N (N = 0, 1, 2, ...)" }
        $n = [int]$Worker
        Ensure-Network
        docker run -d --name "${Prefix}-worker-$n" --network $Network --network-alias "worker-$n" --restart $Restart `
            -e "CHATLOOP_CONTAINER=${Prefix}-worker-$n" -e CHATLOOP_CONTAINER_ENGINE=docker `
            -e CHATLOOP_ROLE=worker -e "CHATLOOP_WORKER=$n" -p "${Publish}:$($MetricsPort + $n):$(9091 + $n)" @Mounts $Image @Rest
    }
    "status" {
        docker ps -a --filter "name=^${Prefix}-" --format "table {{.Names}}`t{{.Status}}`t{{.Ports}}"
        docker exec "${Prefix}-coordinator" chatloop-status --url http://127.0.0.1:8000 @Rest
    }
    "stop" {
        $ids = docker ps -aq --filter "name=^${Prefix}-"
        if ($ids) { docker rm -f $ids | Out-Null }
    }
    default { Get-Content $PSCommandPath -TotalCount 9; exit 2 }
}
